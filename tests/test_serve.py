"""The HTTP service: its answers are the library's, batched requests each get their own results, bad input is a
4xx JSON error (never a 500), and the real server holds a short load and stops cleanly on SIGTERM."""

import json
import signal
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="serving needs the serve extra: pip install 'transformer[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client: pip install httpx")

from fastapi.testclient import TestClient  # noqa: E402

from helpers import CHROMIUM_FLAGS, chromium_or_skip, start_server  # noqa: E402
from helpers import REVERSE_WORDS as WORDS  # noqa: E402
from transformer.checkpoint import load_checkpoint  # noqa: E402
from transformer.generate import DecodingSettings, translate_texts  # noqa: E402
from transformer.serve import Batching, Limits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(reverse_checkpoint):
    return load_checkpoint(reverse_checkpoint)


@pytest.fixture(scope="module")
def client(ckpt):
    app = create_app(
        ckpt, Limits(max_texts=10, max_text_chars=50, max_body_bytes=4000, max_beam=8), Batching(max_wait_ms=50)
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_translations_are_the_librarys(client, ckpt):
    r = client.post("/v1/translate", json={"texts": WORDS, "beam": 3})
    assert r.status_code == 200
    assert r.json()["translations"] == translate_texts(
        ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, WORDS, DecodingSettings(beam_size=3)
    )
    info = client.get("/v1/model").json()
    assert info["task"] == "synthetic" and "/v1/translate" in info["routes"] and info["model"].endswith("/best")
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 404  # off unless asked for (--docs): its scripts come from a CDN


def test_int8_serving_answers_as_the_library_decodes_in_int8(reverse_checkpoint):
    from transformer import TransformerError
    from transformer.cpu.linear import int8_weights

    served, ref = load_checkpoint(reverse_checkpoint), load_checkpoint(reverse_checkpoint)  # two copies: one each
    with TestClient(create_app(served, int8=True)) as c:
        r = c.post("/v1/translate", json={"texts": WORDS, "beam": 2})
        assert c.get("/v1/model").json()["int8"] is True
        assert served.model.output.prepared.int8 is not None  # int8 weights while the app runs
    assert served.model.output.prepared is None  # and its own weights again after
    with torch.inference_mode(), int8_weights(ref.model):
        want = translate_texts(ref.model, ref.src_tokenizer, ref.tgt_tokenizer, WORDS, DecodingSettings(beam_size=2))
    assert r.status_code == 200 and r.json()["translations"] == want
    with pytest.raises(TransformerError, match="choose one of --bf16 and --int8"):
        create_app(served, int8=True, bf16=True)


def test_requests_that_arrive_together_are_decoded_together(client, ckpt):
    """Eight clients at once: fewer model calls than requests, and each gets exactly its own result."""
    before = client.get("/v1/model").json()["batching"]["batches_run"]
    results = {}

    def ask(word):
        results[word] = client.post("/v1/translate", json={"texts": [word]}).json()["translations"]

    threads = [threading.Thread(target=ask, args=(w,)) for w in WORDS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = translate_texts(ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, WORDS)
    assert [results[w] for w in WORDS] == [[a] for a in alone]
    calls = client.get("/v1/model").json()["batching"]["batches_run"] - before
    assert 1 <= calls < len(WORDS)


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{not json", 400, "malformed JSON"),
        (json.dumps({"texts": "abc"}).encode(), 422, "texts: Input should be a valid list"),
        (json.dumps({"text": ["abc"]}).encode(), 422, "texts: Field required"),
        (json.dumps({"texts": ["abc", 5]}).encode(), 422, "texts.1: Input should be a valid string"),
        (json.dumps({"texts": ["abc"], "beam": 0}).encode(), 422, "beam: Input should be greater than or equal to 1"),
        (json.dumps({"texts": ["abc"], "beam": 99}).encode(), 422, "beam: Input should be less than or equal to 8"),
        (json.dumps({"texts": ["abc"], "max_len_b": -1}).encode(), 422, "max_len_b"),
        (json.dumps({"texts": ["abc"], "colour": "red"}).encode(), 422, "colour: Extra inputs are not permitted"),
        (json.dumps({"texts": ["a"] * 11}).encode(), 413, "the limit is 10 (--max-texts)"),
        (json.dumps({"texts": ["a" * 51]}).encode(), 413, "texts[0] has 51 characters; the limit is 50"),
        (json.dumps({"texts": ["a" * 30] * 9 + ["b" * 4000]}).encode(), 413, "request body over 4000 bytes"),
    ],
)
def test_bad_input_is_a_clear_4xx(client, body, status, needle):
    r = client.post("/v1/translate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_routes_the_checkpoint_cannot_serve_and_unknown_routes(client):
    r = client.post("/v1/classify", json={"texts": ["abc"]})
    assert r.status_code == 404 and "'synthetic' checkpoint: /v1/classify is not available" in r.json()["detail"]
    assert client.get("/v2/nothing").status_code == 404
    assert client.get("/v1/translate").status_code == 405


def test_the_page_shows_a_translation_and_its_attention(client):
    assert "Translate" in client.get("/").text
    r = client.post("/v1/attention", json={"text": "hello"})
    assert r.status_code == 200 and r.json()["translation"] == "olleh" and "Attention explorer" in r.json()["page"]


def test_generation_streams_server_sent_events(tmp_path):
    import torch

    from helpers import tiny_model
    from transformer.checkpoint import Checkpoint
    from transformer.tokenizers import CharTokenizer

    tok = CharTokenizer("abcdefgh ")
    model = tiny_model("decoder-only", vocab=tok.vocab_size)
    cfg = model.config
    # random weights: make the special tokens impossible (</s> ends a generation, the others print nothing),
    # so all 12 tokens come and each prints one character
    specials = torch.arange(4)
    model.output.register_forward_hook(lambda m, i, logits: logits.index_fill_(-1, specials, -1e9))
    ckpt = Checkpoint(model, cfg, "lm", {"tgt": tok}, {}, tmp_path)
    with TestClient(create_app(ckpt)) as c:
        whole = c.post("/v1/generate", json={"prompt": "ab", "max_new_tokens": 12, "seed": 3}).json()["text"]
        with c.stream(
            "POST", "/v1/generate", json={"prompt": "ab", "max_new_tokens": 12, "seed": 3, "stream": True}
        ) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["text"] for e in events[:-1]) == whole and len(whole) == 12


# ----------------------------------------------------------------------------------------------------------
# The real server, over loopback


@pytest.fixture
def server(reverse_checkpoint):
    url, proc = start_server(reverse_checkpoint)
    yield url, proc
    if proc.poll() is None:
        proc.kill()


def test_a_short_load_and_a_clean_stop(server, ckpt):
    """16 clients for 3 seconds: no errors, every answer right; then SIGTERM lets the last requests finish and
    the server exits 0."""
    import asyncio

    url, proc = server
    want = dict(zip(WORDS, translate_texts(ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, WORDS)))
    outcomes = []

    async def client(i, until):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            n = 0
            while time.time() < until:
                word = WORDS[(i + n) % len(WORDS)]
                r = await c.post("/v1/translate", json={"texts": [word]})
                outcomes.append(r.status_code == 200 and r.json()["translations"] == [want[word]])
                n += 1

    async def load():
        until = time.time() + 3
        await asyncio.gather(*(client(i, until) for i in range(16)))

    asyncio.run(load())
    assert len(outcomes) > 16 and all(outcomes)
    # a request in flight when SIGTERM arrives is still answered
    answered = {}

    def late():
        answered["r"] = httpx.post(url + "/v1/translate", json={"texts": WORDS * 2, "beam": 4}, timeout=60)

    t = threading.Thread(target=late)
    t.start()
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    t.join()
    assert proc.wait(timeout=60) == 0
    assert answered["r"].status_code == 200 and len(answered["r"].json()["translations"]) == 16


def test_the_page_in_a_real_browser(server):
    sync_api, chromium = chromium_or_skip()
    url, _ = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url + "/")
        page.fill("#src", "hello")
        page.click("#go")
        page.wait_for_function("document.getElementById('out').textContent === 'olleh'", timeout=30000)
        frame = page.frame_locator("#explorer")
        assert frame.locator("table").count() >= 1  # the explorer's grid drew
        browser.close()
    assert not errors, errors
