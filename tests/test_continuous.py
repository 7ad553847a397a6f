"""Continuous batching (serve/continuous.py): requests that join and leave a running batch each get exactly the
tokens `generate.sample` gives them alone (greedy, and seeded sampling), within the KV budget; the cache
operations it rests on (`DecoderCache.join`) keep every row's keys, values, positions and masks."""

import pytest
import torch

from helpers import tiny_model
from transformer.generate import sample
from transformer.serve.batcher import Job
from transformer.serve.continuous import Completion, ContinuousBatcher
from transformer.tokenizers import CharTokenizer

TOK = CharTokenizer("abcdefgh ")


@pytest.fixture(scope="module", params=["learned", "rope"])
def model(request):
    torch.manual_seed(0)
    overrides = (
        {"positional": "rope", "norm": "rmsnorm", "n_kv_heads": 1, "sliding_window": 6}
        if request.param == "rope"
        else {}
    )
    return tiny_model("decoder-only", vocab=TOK.vocab_size, **overrides).eval()


def alone(model, prompt, req: Completion, choice=0) -> list[int]:
    """What `sample` gives this choice alone, stopped at an end id as the batcher stops."""
    gen = torch.Generator().manual_seed(req.seed + choice)
    out = []
    with torch.inference_mode():
        for t in sample(model, torch.tensor([prompt]), req.max_tokens, req.temperature, req.top_k, req.top_p, gen):
            if int(t[0]) in model.config.eos_ids:
                break
            out.append(int(t[0]))
    return out


def job_for(req: Completion, answers: dict, key) -> Job:
    job = Job("complete", [], req)
    job.deliver = lambda result=None, error=None: answers.__setitem__(key, result)
    return job


def run_until_idle(batcher: ContinuousBatcher, arrivals: dict) -> int:
    """Advance; the jobs in arrivals[k] join before round k. Returns the rounds run."""
    rounds = 0
    while batcher.busy or any(k >= rounds for k in arrivals):
        for job in arrivals.pop(rounds, []):
            batcher.add(job)
        batcher.advance()
        rounds += 1
    return rounds


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_requests_joining_a_running_batch_get_what_they_would_alone(model, temperature):
    prompts = ["abc", "h", "gggg ab", "dead bee", "c"]
    reqs = [
        Completion(tuple(TOK.encode(p)), max_tokens=6 + 3 * i, temperature=temperature, n=1 + i % 2, seed=10 * i)
        for i, p in enumerate(prompts)
    ]
    answers = {}
    jobs = [job_for(r, answers, i) for i, r in enumerate(reqs)]
    batcher = ContinuousBatcher(model, TOK, max_kv_tokens=10_000, max_rows=16)
    # two at once, one a step later, two after the first ones have been decoding for a while
    run_until_idle(batcher, {0: jobs[:2], 1: jobs[2:3], 5: jobs[3:]})
    assert batcher.cache is None and not batcher.rows  # everything left, the cache with it
    for i, r in enumerate(reqs):
        assert len(answers[i]) == r.n
        for c, choice in enumerate(answers[i]):
            want = alone(model, list(r.prompt), r, c)
            assert choice["tokens"] == len(want)
            assert choice["text"] == TOK.decode(list(r.prompt) + want)[len(TOK.decode(list(r.prompt))) :]
            assert choice["finish_reason"] == ("length" if len(want) == r.max_tokens else "stop")


def test_the_budget_holds_requests_back_until_rows_leave(model):
    reqs = [Completion(tuple(TOK.encode("abc")), max_tokens=5, temperature=0.0, seed=0) for _ in range(4)]
    answers = {}
    batcher = ContinuousBatcher(model, TOK, max_kv_tokens=2 * 8, max_rows=16)  # two rows of 3 + 5 positions
    for i, r in enumerate(reqs):
        batcher.add(job_for(r, answers, i))
    batcher.advance()
    assert len(batcher.pending) == 2  # two admitted (they may have ended already), two wait
    if batcher.cache is not None:
        assert batcher.cache.batch_size() * batcher.cache.layers[0][0].k.size(2) <= 16
    run_until_idle(batcher, {})
    assert len(answers) == 4 and len({a[0]["text"] for a in answers.values()}) == 1
    assert not batcher.fits(Completion((1,) * 10, max_tokens=7))  # 17 positions: never


def test_stop_strings_end_a_choice_and_are_not_sent(model):
    for start in ("ab", "h", "c", "gg", "dead", "bee", "fa", "e"):  # a prompt whose greedy text is long enough
        prompt = tuple(TOK.encode(start))
        free = alone(model, list(prompt), Completion(prompt, max_tokens=12, temperature=0.0, seed=0))
        text = TOK.decode(list(prompt) + free)[len(start) :]
        if len(text) >= 4:
            break
    assert len(text) >= 4, "no prompt gave four characters before the end"
    stop = text[2:4]
    answers, events = {}, []
    job = job_for(Completion(prompt, max_tokens=12, temperature=0.0, seed=0, stop=(stop, "zz")), answers, 0)
    batcher = ContinuousBatcher(model, TOK, max_kv_tokens=1000, max_rows=4)
    run_until_idle(batcher, {0: [job]})
    assert answers[0][0]["text"] == text[: text.find(stop)] and answers[0][0]["finish_reason"] == "stop"
    # streamed: the same text, nothing of the stop string ever sent
    job = Job("complete", [], Completion(prompt, max_tokens=12, temperature=0.0, seed=0, stop=(stop,)))
    job.stream = True
    job.emit = events.append
    run_until_idle(batcher, {0: [job]})
    assert events[-1] is None and events[-2][2] == "stop"
    assert "".join(e[1] for e in events[:-1]) == text[: text.find(stop)]


def test_a_cancelled_request_leaves_at_the_next_step(model):
    answers = {}
    long = job_for(Completion(tuple(TOK.encode("a")), max_tokens=50, temperature=0.5, seed=1), answers, 0)
    other = job_for(Completion(tuple(TOK.encode("b")), max_tokens=3, temperature=0.0, seed=0), answers, 1)
    batcher = ContinuousBatcher(model, TOK, max_kv_tokens=1000, max_rows=4)
    batcher.add(long)
    batcher.add(other)
    batcher.advance()
    long.cancelled = True
    batcher.advance()
    assert all(r.job is not long for r in batcher.rows)
    run_until_idle(batcher, {})
    assert 1 in answers and 0 not in answers


def test_joined_caches_decode_as_separate_ones(model):
    """DecoderCache.join: rows of two caches (one of them left-padded) joined, a row dropped, decode on exactly
    as each would alone (fp32: the same products up to summation order, hence the 1e-5)."""
    torch.manual_seed(1)
    a, b = torch.randint(4, TOK.vocab_size, (2, 5)), torch.randint(4, TOK.vocab_size, (1, 3))
    with torch.inference_mode():
        ca, cb = model.decoder.new_cache(8), model.decoder.new_cache(8)
        model(a, ca)
        model(b, cb)
        ca.join(cb, capacity=12)
        ca.join(None, capacity=12, keep=torch.tensor([0, 2]))  # drop a's second row
        nxt = torch.randint(4, TOK.vocab_size, (2, 1))
        joined = model(nxt, ca)[:, -1]
        want = [model(torch.cat([a[0:1], nxt[0:1]], 1))[0, -1], model(torch.cat([b, nxt[1:2]], 1))[0, -1]]
    torch.testing.assert_close(joined, torch.stack(want), atol=1e-5, rtol=1e-5)
