"""The OpenAI-compatible routes, spoken to by the real `openai` client against a live `transformer serve`
process: answers equal to the library's (ChatSession, generate.sample), streams equal to whole answers, n
choices, stop strings, a seeded sample reproduced, a cancelled stream that stops generating, and bad requests
answered in OpenAI's error shape. The browser page streams a chat."""

import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="serving needs the serve extra: pip install 'transformer[serve]'")
openai = pytest.importorskip("openai", reason="the OpenAI client: pip install openai (in the dev extra)")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client: pip install httpx")

from fastapi.testclient import TestClient  # noqa: E402

from helpers import CHROMIUM_FLAGS, chromium_or_skip, start_server, tiny_decoder_dir  # noqa: E402
from transformer.chat import ChatSession  # noqa: E402
from transformer.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from transformer.generate import SamplingSettings, TextStream, sample  # noqa: E402
from transformer.interop import from_pretrained  # noqa: E402
from transformer.serve import Batching, create_app  # noqa: E402

KEY, NAME = "sk-test-key", "tiny-chat"


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny Llama with a Llama 3 chat template and a context of 2048, imported as a checkpoint."""
    path, _ = tiny_decoder_dir(tmp_path_factory.mktemp("hf-chat"), "llama", chat="llama3", max_position_embeddings=2048)
    ckpt = from_pretrained(path)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "chat", ckpt.model, ckpt.task, ckpt.tokenizers, ckpt.meta)


@pytest.fixture(scope="module")
def ckpt(chat_checkpoint):
    return load_checkpoint(chat_checkpoint)


@pytest.fixture(scope="module")
def server(chat_checkpoint):
    url, proc = start_server(chat_checkpoint, "--api-key", KEY, "--name", NAME, "--max-new-tokens", "2000")
    yield url
    proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def library_chat(ckpt, text: str, max_tokens: int) -> str:
    settings = SamplingSettings(max_new_tokens=max_tokens, temperature=0.0)
    with ChatSession(ckpt.model, ckpt.tgt_tokenizer, ckpt.meta["chat"], settings=settings) as session:
        reply = "".join(session.reply(text))
        return reply, len(session.last_prompt)


def test_models_and_a_chat_answered_as_the_library_answers(client, ckpt):
    assert [m.id for m in client.models.list().data] == [NAME]
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hello there"}], max_tokens=20, temperature=0
    )
    want, prompt_tokens = library_chat(ckpt, "hello there", 20)
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens


def test_a_stream_is_the_whole_answer_in_pieces(client):
    args = dict(model=NAME, messages=[{"role": "user", "content": "tell me"}], max_tokens=30, temperature=0.8, seed=5)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_n_choices_seeded_as_sample_is(client, ckpt):
    r = client.completions.create(model=NAME, prompt="once upon", max_tokens=12, temperature=1.0, n=3, seed=42)
    again = client.completions.create(model=NAME, prompt="once upon", max_tokens=12, temperature=1.0, n=3, seed=42)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # a seed reproduces the sample
    tok = ckpt.tgt_tokenizer
    ids = tok.encode("once upon")
    for i, choice in enumerate(r.choices):  # choice i: generate.sample seeded with seed + i
        stream, text = TextStream(tok, ids), ""
        gen = torch.Generator().manual_seed(42 + i)
        with torch.inference_mode():
            for t in sample(ckpt.model, torch.tensor([ids]), 12, 1.0, generator=gen):
                if int(t[0]) in ckpt.config.eos_ids:
                    break
                text += stream.push(int(t[0]))
        assert choice.text == text
    assert r.usage.prompt_tokens == 3 * len(ids)


def test_stop_strings(client):
    args = dict(model=NAME, prompt="abc", max_tokens=40, temperature=0)
    free = client.completions.create(**args).choices[0].text
    assert len(free) >= 6, free
    stop = free[3:5]
    r = client.completions.create(**args, stop=[stop, "\x00never"])
    assert r.choices[0].text == free[: free.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_a_cancelled_stream_stops_generating(client, server):
    def steps():
        info = httpx.get(server + "/v1/model", headers={"authorization": f"Bearer {KEY}"}).json()["batching"]
        return info["generation_steps"], info["generating"]

    before, _ = steps()
    stream = client.completions.create(model=NAME, prompt="a", max_tokens=1900, temperature=1.0, seed=1, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 10
    while steps()[1] and time.time() < deadline:
        time.sleep(0.05)
    done, generating = steps()
    assert generating == 0  # the row left the batch
    time.sleep(0.3)
    assert steps()[0] == done and done - before < 1900  # and stopped long before its 1900 tokens


@pytest.mark.parametrize(
    "call, error, status, needle",
    [
        (
            dict(extra_body={"colour": "red"}),
            openai.BadRequestError,
            400,
            "Unrecognized request argument supplied: colour",
        ),
        (dict(model="gpt-4o"), openai.NotFoundError, 404, "this server serves 'tiny-chat'"),
        (dict(max_tokens=1_000_000), openai.BadRequestError, 400, "--max-new-tokens"),
        (dict(temperature=5), openai.BadRequestError, 400, "temperature"),
        (dict(n=0), openai.BadRequestError, 400, "n: Input should be greater than or equal to 1"),
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), openai.BadRequestError, 400, "tools"),
        (dict(messages=[]), openai.BadRequestError, 400, "messages"),
        (dict(seed=2**70), openai.BadRequestError, 400, "seed"),
    ],
)
def test_bad_requests_get_openais_error_shape(client, call, error, status, needle):
    args = {**dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5), **call}
    with pytest.raises(error) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == status
    body = e.value.response.json()["error"]
    assert needle in body["message"] and set(body) == {"message", "type", "param", "code"}


def test_the_context_length_and_the_api_key(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="a" * 500, max_tokens=1999)
    assert e.value.code == "context_length_exceeded" and "maximum context length is 2048" in e.value.message
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.code == "invalid_api_key"
    assert httpx.post(server + "/v1/generate", json={"prompt": "a"}).status_code == 401  # our own routes too
    assert httpx.get(server + "/health").status_code == 200  # but not /health


def test_a_full_queue_is_429_with_retry_after(ckpt):
    with TestClient(create_app(ckpt, batching=Batching(max_queue=0), name=NAME)) as c:
        body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_without_a_key_only_loopback(chat_checkpoint):
    cmd = [sys.executable, "-m", "transformer", "serve", str(chat_checkpoint), "--host", "0.0.0.0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"PATH": "", "HOME": "/tmp"})
    assert r.returncode != 0 and "--api-key" in r.stderr and "--insecure" in r.stderr and "Traceback" not in r.stderr


def test_the_page_streams_a_chat(server):
    sync_api, chromium = chromium_or_skip()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(server + "/")
        page.fill("#key", KEY)
        page.fill("#msg", "hello")
        page.fill("#max", "12")
        page.click("#send")
        page.wait_for_selector(".reply[data-done='1']", timeout=30000)
        assert page.locator(".error").count() == 0
        browser.close()
    assert not errors, errors
