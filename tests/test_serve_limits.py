"""A server that one request cannot knock over and that tells no one more than it should: output capped on every
route, work split to the batch budget or refused, decoding abandoned between steps, the attention answer capped
and compact, back-pressure (429, 504, 408, a header time-out), a dead worker reported, errors that say what
happened (also mid-stream), nothing of the host revealed, the Host header checked, and a fuzz over every route's
JSON that finds no 5xx."""

import base64
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="serving needs the serve extra: pip install 'transformer[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client: pip install httpx")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import REVERSE_WORDS as WORDS  # noqa: E402
from helpers import free_port, tiny_model  # noqa: E402
from transformer.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from transformer.generate import DecodingCancelled, DecodingSettings, translate_texts  # noqa: E402
from transformer.serve import Batching, Limits, create_app  # noqa: E402
from transformer.serve.guards import check_exposure, default_hosts  # noqa: E402
from transformer.tokenizers import CharTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(reverse_checkpoint):
    return load_checkpoint(reverse_checkpoint)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tok = CharTokenizer("abcdefgh ")
    model = tiny_model("decoder-only", vocab=tok.vocab_size, max_positions=64)
    return Checkpoint(model, model.config, "lm", {"tgt": tok}, {}, tmp_path_factory.mktemp("secret-dir") / "lm")


def test_output_is_capped_and_work_split_to_the_batch_budget(ckpt):
    """--max-new-tokens caps a translation whatever max_len_a/b say; a request is split into batches of at most
    --max-batch-tokens (beam x (source + output) tokens), and a text that alone does not fit is a 413."""
    limits, batching = Limits(max_new_tokens=3, max_texts=64), Batching(max_batch_tokens=60, max_wait_ms=0)
    with TestClient(create_app(ckpt, limits, batching)) as c:
        r = c.post("/v1/translate", json={"texts": WORDS * 4, "beam": 2, "max_len_a": 10, "max_len_b": 3})
        assert r.status_code == 200
        want = translate_texts(
            ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, WORDS * 4, DecodingSettings(2, 1.0, 10, 3, max_len=3)
        )
        assert r.json()["translations"] == want and all(len(t) <= 3 for t in want)
        assert c.get("/v1/model").json()["batching"]["batches_run"] >= 4  # 32 texts of up to 2 x (10 + 3) slots
        r = c.post("/v1/translate", json={"texts": ["a" * 40], "beam": 2})
        assert r.status_code == 413 and "--max-batch-tokens" in r.json()["detail"]


def test_decoding_stops_between_steps_when_told(ckpt):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    for beam in (1, 4):
        calls.clear()
        with pytest.raises(DecodingCancelled):
            translate_texts(
                ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, ["qwertyui"], DecodingSettings(beam), 64, stop
            )
        assert len(calls) == 3  # two steps ran, the third was not


def test_attention_is_capped_and_compact(ckpt):
    with TestClient(create_app(ckpt, Limits(max_attention_tokens=6))) as c:
        r = c.post("/v1/attention", json={"text": "abcdefg"})
        assert r.status_code == 413 and "--max-attention-tokens" in r.json()["detail"]
        page = c.post("/v1/attention", json={"text": "hello"}).json()["page"]
    data = json.loads(page.split("const DATA = ", 1)[1].split(";\n", 1)[0])
    cross = data["kinds"]["cross"]
    raw = base64.b64decode(cross["weights"][0][0])  # one byte per weight
    rows, cols = len(cross["queries"]), len(cross["keys"])
    assert len(raw) == rows * cols
    for i in range(rows):  # each query's weights still sum to 1, to within the rounding of 1/255 per weight
        assert abs(sum(raw[i * cols : (i + 1) * cols]) / 255 - 1) <= cols / 510 + 1e-9


def test_a_full_queue_a_timeout_and_a_dead_worker(ckpt):
    release = threading.Event()
    with TestClient(create_app(ckpt, Limits(request_timeout=0.3), Batching(max_wait_ms=0))) as c:
        svc = c.app.state.service
        real = svc.batcher.run
        svc.batcher.run = lambda *a: release.wait(10) and real(*a)  # the worker stuck on one batch
        r = c.post("/v1/translate", json={"texts": ["abc"]})
        assert r.status_code == 504 and "--request-timeout" in r.json()["detail"]
        release.set()
        deaths = []
        c.app.state.on_worker_death = deaths.append

        def die(*a):
            raise SystemExit("a bug in the worker")

        svc.batcher.run = die
        assert c.post("/v1/translate", json={"texts": ["abc"]}).status_code == 504
        assert c.get("/health").status_code == 503 and isinstance(deaths[0], SystemExit)
    with TestClient(create_app(ckpt, batching=Batching(max_queue=0))) as c:
        r = c.post("/v1/translate", json={"texts": ["abc"]})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "--max-queue" in r.json()["detail"]


def test_errors_say_what_happened(lm):
    with TestClient(create_app(lm)) as c:
        r = c.post("/v1/generate", json={"prompt": "ab", "seed": 2**70})
        assert r.status_code == 422 and "seed" in r.json()["detail"]

        def chunks():  # a chunked body (no content-length) over the limit
            for _ in range(20):
                yield b"x" * 100_000

        r = c.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "--max-body-bytes" in r.json()["detail"]
        pool = c.app.state.service.batcher.pool
        pool.advance = lambda: (_ for _ in ()).throw(RuntimeError("out of memory"))  # the next step fails
        with c.stream("POST", "/v1/generate", json={"prompt": "ab", "max_new_tokens": 5, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and "[DONE]" not in events
        assert "generation failed: out of memory" in json.loads(events[-1])["detail"]
        body = {"model": "lm", "prompt": "ab", "max_tokens": 3, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["type"] == "server_error"


def test_nothing_of_the_host_is_revealed(lm):
    secret = str(lm.path.parent)
    with TestClient(create_app(lm)) as c:
        info = c.get("/v1/model").text
        assert secret not in info and "d_model" not in info and json.loads(info)["model"] == "lm"
        assert c.get("/openapi.json").status_code == 404 and c.get("/docs").status_code == 404
    with TestClient(create_app(lm, docs=True)) as c:
        assert c.get("/docs").status_code == 200 and secret not in c.get("/openapi.json").text


def test_the_host_header_is_checked(lm, caplog):
    with TestClient(create_app(lm, allowed_hosts=default_hosts("127.0.0.1")), base_url="http://127.0.0.1") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"host": "attacker.example:8000"}).status_code == 400  # DNS rebinding
    assert default_hosts("0.0.0.0") == ["*"] and "box.lan" in default_hosts("box.lan")
    check_exposure("0.0.0.0", None, insecure=True)
    assert "without an API key" in caplog.text


def test_slow_clients_are_cut_off(reverse_checkpoint):
    port = free_port()
    cmd = [sys.executable, "-m", "transformer", "serve", str(reverse_checkpoint), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--device", "cpu", "--body-timeout", "1"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # a body sent a byte at a time: 408 once --body-timeout has passed
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
            start = time.time()
            answer = b""
            while time.time() - start < 8 and b"\r\n\r\n" not in answer:
                try:
                    s.sendall(b" ")
                    s.settimeout(0.3)
                    answer += s.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    break
            assert answer.startswith(b"HTTP/1.1 408"), answer
        # headers sent a byte at a time: the connection is closed
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            start, closed = time.time(), False
            for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                try:
                    s.sendall(bytes([byte]))
                    s.settimeout(0.3)
                    if s.recv(4096) == b"":
                        closed = True
                        break
                except socket.timeout:
                    continue
                except OSError:
                    closed = True
                    break
            assert closed and time.time() - start < 8
    finally:
        proc.kill()


# ----------------------------------------------------------------------------------------------------------
# Fuzz: any JSON to any route, no 5xx and an answer within the time-out

FIELDS = ["texts", "text", "beam", "prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stream",
          "model", "messages", "max_tokens", "n", "stop", "max_len_a", "max_len_b", "length_penalty", "role",
          "content", "stream_options", "logprobs", "tools"]  # fmt: skip
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=12,
)
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6) | values


@pytest.fixture(scope="module")
def fuzz_clients(ckpt, lm):
    # refusals by the thousand from one address: not slowed here (the slowing has its own test)
    limits = Limits(max_new_tokens=8, max_texts=8, request_timeout=20, max_refusals_per_s=0)
    with TestClient(create_app(ckpt, limits), raise_server_exceptions=False) as a:
        with TestClient(create_app(lm, limits, name="lm"), raise_server_exceptions=False) as b:
            yield a, b


ROUTES = ["/v1/translate", "/v1/attention", "/v1/generate", "/v1/classify", "/v1/embed", "/v1/chat/completions",
          "/v1/completions"]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=bodies, which=st.sampled_from([0, 1]))
def test_fuzz_no_route_answers_5xx(fuzz_clients, route, body, which):
    if isinstance(body, dict) and route in ("/v1/chat/completions", "/v1/completions"):
        body.setdefault("model", "lm")
    r = fuzz_clients[which].post(route, json=body)
    assert r.status_code < 500, (route, body, r.status_code, r.text)
    assert r.headers["content-type"].startswith(("application/json", "text/event-stream")), r.headers


def test_small_requests_run_inside_a_long_batch_and_get_their_own_answers(ckpt):
    """With a slice of 0 every decoding step of the long batch lets the waiting requests run first (nested in
    it, the model's prepared weights and caches shared): everyone still gets the library's answers."""
    with TestClient(create_app(ckpt, batching=Batching(max_wait_ms=0))) as c:
        batcher = c.app.state.service.batcher
        batcher.slice = 0.0
        ran, real_group, real_run = [], batcher._run_group, batcher.run
        batcher._run_group = lambda group: (
            ran.append((batcher._inside, [t for j in group for t in j.texts])),
            real_group(group),
        )[1]

        waited = []

        def run(kind, settings, texts, jobs, pause):
            if len(texts) > 1 and not waited:  # the big request's first batch waits for the others to queue
                while batcher.queue.qsize() < len(WORDS):
                    time.sleep(0.001)
                waited.append(True)
            return real_run(kind, settings, texts, jobs, pause)

        batcher.run = run
        out = {}

        def ask(key, body):
            out[key] = c.post("/v1/translate", json=body).json()["translations"]

        big = threading.Thread(target=ask, args=("big", {"texts": WORDS * 8, "beam": 16}))
        big.start()
        while not ran:
            time.sleep(0.001)
        smalls = [threading.Thread(target=ask, args=(w, {"texts": [w]})) for w in WORDS]
        for t in smalls:
            t.start()
        for t in [big, *smalls]:
            t.join()
    want = translate_texts(ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, WORDS, DecodingSettings(16))
    assert out["big"] == want * 8
    assert [out[w] for w in WORDS] == [
        [a] for a in translate_texts(ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, WORDS)
    ]
    inside = sorted(t for was_inside, texts in ran if was_inside for t in texts)
    assert inside == sorted(WORDS)  # all of them ran inside the big request's first batch


def test_a_client_that_keeps_being_refused_is_answered_late():
    """SlowRefusals with a stopped clock and a recorded sleep: the first `rate` refusals of an address are
    answered at once, the next one `delay` late; its well-formed requests and other addresses are not slowed;
    a second later the bucket has drained by `rate`."""
    import asyncio

    from transformer.serve.guards import SlowRefusals

    async def app(scope, receive, send):
        status = 413 if scope["path"] == "/bad" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard, now, slept = SlowRefusals(app, rate=3, delay=1.0, addresses=2), [100.0], []
    guard.clock = lambda: now[0]

    async def sleep(seconds):
        slept.append(seconds)

    guard.sleep = sleep

    def call(path, address="10.0.0.1"):
        sent = []

        async def send(message):
            sent.append(message)

        asyncio.run(guard({"type": "http", "path": path, "client": (address, 5000)}, None, send))
        return sent[0]["status"], len(slept)

    assert [call("/bad") for _ in range(3)] == [(413, 0)] * 3
    assert call("/bad") == (413, 1) and slept == [1.0]  # the 4th refusal within the second: late
    assert call("/good") == (200, 1)  # a well-formed request of the same address: at once
    assert call("/bad", "10.0.0.2") == (413, 1)  # another address: its own count
    now[0] += 1.0  # 3 refusals drained: 4 - 3 + 1 = 2 <= 3
    assert call("/bad") == (413, 1)
    call("/bad", "10.0.0.3")
    assert set(guard.buckets) == {"10.0.0.1", "10.0.0.3"}  # at most `addresses` remembered: the oldest forgotten
    guard.most_sleeping = 0  # as many refusals waiting as allowed: those over the rate are answered at once
    assert [call("/bad") for _ in range(3)] == [(413, 1)] * 3  # counts 3, 4, 5: two over the rate
    guard.rate = 0  # off: never slowed, nothing counted
    assert [call("/bad")[1] for _ in range(10)] == [1] * 10


def test_the_server_slows_refusals(ckpt):
    """Installed by create_app, outside every other guard: at 0.5 refusals a second the first is 1 s late
    (a lower bound on time: true on any machine)."""
    with TestClient(create_app(ckpt, Limits(max_texts=1, max_refusals_per_s=0.5))) as c:
        start = time.perf_counter()
        r = c.post("/v1/translate", json={"texts": ["a", "b"]})
        assert r.status_code == 413 and time.perf_counter() - start >= 1.0
