import pytest
import torch

from helpers import tiny_model
from transformer import TransformerError
from transformer.batching import pad_batch
from transformer.checkpoint import load_checkpoint
from transformer.cpu.step import StepDecoder
from transformer.generate import beam_search, filter_logits, greedy, sample, translate_texts


@pytest.fixture(scope="module")
def trained(reverse_checkpoint):
    return load_checkpoint(reverse_checkpoint)


def encode(ckpt, texts):
    return pad_batch([ckpt.src_tokenizer.encode(t) for t in texts])


WORDS = ["abc", "hello", "zyxwvut", "q", "transfor", "mmmm"]


def test_trained_model_reverses_held_out_strings(reverse_run):
    _, record = reverse_run
    assert record["exact_match"] >= 0.9


def test_greedy_with_cache_equals_full_recompute(trained):
    src = encode(trained, WORDS)
    assert greedy(trained.model, src) == greedy(trained.model, src, use_cache=False)


def test_beam_size_one_is_greedy(trained):
    src = encode(trained, WORDS)
    assert beam_search(trained.model, src, beam_size=1) == greedy(trained.model, src)
    random_model = tiny_model(vocab=30, d_model=32, d_ff=32)
    assert beam_search(random_model, src, beam_size=1, max_len_b=5) == greedy(random_model, src, max_len_b=5)


def test_beam_search_batch_equals_one_by_one(trained):
    src = encode(trained, WORDS)
    batched = beam_search(trained.model, src, beam_size=4)
    alone = [beam_search(trained.model, encode(trained, [w]), beam_size=4)[0] for w in WORDS]
    assert batched == alone
    texts = [trained.tgt_tokenizer.decode(t) for t in batched]
    assert sum(t == w[::-1] for t, w in zip(texts, WORDS)) >= 5


def no_eos(model):
    """The model with </s> made impossible (its logit -1e9): decoding runs to the length limit exactly."""
    import copy

    from transformer.tokenizers import EOS

    model = copy.deepcopy(model)
    model.output.register_forward_hook(lambda m, i, logits: logits.index_fill_(-1, torch.tensor([EOS]), -1e9))
    return model


def test_decoding_stops_exactly_at_the_length_limit(trained, monkeypatch):
    src = encode(trained, WORDS)
    model = no_eos(trained.model)
    calls = []
    real_decode, real_step = model.decode, StepDecoder.step
    model.decode = lambda *args, **kw: (calls.append(1), real_decode(*args, **kw))[1]  # the module path
    monkeypatch.setattr(StepDecoder, "step", lambda *args, **kw: (calls.append(1), real_step(*args, **kw))[1])
    for a, b in [(0.0, 3), (0.5, 0), (1.0, 1), (1.5, 10)]:
        limits = [int(len(w) * a) + b for w in WORDS]
        for out in (
            beam_search(model, src, 3, max_len_a=a, max_len_b=b),
            greedy(model, src, a, b),
            greedy(model, src, a, b, use_cache=False),
        ):
            assert [len(o) for o in out] == limits
        calls.clear()
        greedy(model, src, a, b)
        assert len(calls) == max(limits)  # one decoder step per token written, none wasted after the last


def test_invalid_decoding_arguments(trained):
    src = encode(trained, WORDS)
    with pytest.raises(TransformerError, match="beam size"):
        beam_search(trained.model, src, beam_size=0)
    with pytest.raises(TransformerError, match="must not be negative"):
        greedy(trained.model, src, max_len_b=-1)


def test_translate_texts_keeps_order_and_handles_empty(trained):
    texts = ["abcdef", "", "xy", "hello"]
    out = translate_texts(trained.model, trained.src_tokenizer, trained.tgt_tokenizer, texts, batch_size=2)
    assert out[1] == ""
    assert out[0] == "fedcba" and out[2] == "yx"


def test_filter_logits_support():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[False, True, True, False, False]]
    probs = logits.softmax(-1)[0]  # 0.09, 0.66, 0.24, 0.03, 0.01
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [False, True, True, False, False] and probs[1] < 0.7
    assert torch.isfinite(filter_logits(logits, top_p=0.5))[0].tolist() == [False, True, False, False, False]


def lm():
    return tiny_model("decoder-only", vocab=20, d_model=32, n_decoder_layers=2, d_ff=64, tie_embeddings="decoder")


def test_sampling_support_greedy_and_seed():
    model = lm()
    prompt = torch.tensor([[1, 5, 6]])
    greedy_tokens = torch.cat(list(sample(model, prompt, 10, temperature=0)))
    # temperature 0 and top-k 1 are greedy: each token is the argmax of a full recompute
    ids = prompt
    for tok in greedy_tokens:
        assert int(model(ids)[0, -1].argmax()) == int(tok)
        ids = torch.cat([ids, tok.view(1, 1)], 1)
    topk1 = torch.cat(
        list(sample(model, prompt, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0)))
    )
    assert torch.equal(topk1, greedy_tokens)
    a = torch.cat(list(sample(model, prompt, 20, top_k=3, generator=torch.Generator().manual_seed(7))))
    b = torch.cat(list(sample(model, prompt, 20, top_k=3, generator=torch.Generator().manual_seed(7))))
    assert torch.equal(a, b)
    # top-k never leaves its support
    ids = prompt
    for tok in a:
        assert int(tok) in model(ids)[0, -1].topk(3).indices.tolist()
        ids = torch.cat([ids, tok.view(1, 1)], 1)


def test_sampling_argument_errors():
    model = lm()
    prompt = torch.tensor([[1]])
    for kw, msg in [
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-1), "top-k"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
    ]:
        with pytest.raises(TransformerError, match=msg):
            next(sample(model, prompt, 5, **kw))


def test_prompt_longer_than_learned_positions_is_cropped():
    model = tiny_model("decoder-only", vocab=20, positional="learned", max_positions=8)
    long_prompt = torch.randint(4, 20, (1, 20))
    out = torch.cat(list(sample(model, long_prompt, 30, temperature=0)))  # also runs past the table's end
    assert out.shape == (30,)
    # each token is the argmax of a full recompute (no cache) over the window the model sees: the last 8 tokens
    # of the prompt; then, whenever the 8 positions are full, the last 6 tokens and what follows them
    ids = long_prompt[0].tolist()
    window, cached = ids[-8:], 8
    with torch.no_grad():
        for tok in out.tolist():
            assert tok == int(model(torch.tensor([window]))[0, -1].argmax())
            ids.append(tok)
            window, cached = (ids[-6:], 6) if cached >= 8 else (window + [tok], cached + 1)


def test_streamed_text_keeps_the_space_after_the_prompt():
    """Bug: `generate` decoded the new tokens alone, and a Metaspace (BPE) tokenizer's word-initial token
    lost its space: prompt "ROMEO:" printed "ROMEO:the king"."""
    from transformer.generate import TextStream
    from transformer.tokenizers import BPETokenizer

    tok = BPETokenizer.train(["ROMEO: the king is here", "JULIET: the king is there"] * 50, vocab_size=60)
    full = tok.encode("ROMEO: the king")
    prompt = tok.encode("ROMEO:")
    assert full[: len(prompt)] == prompt
    stream = TextStream(tok, prompt)
    assert "ROMEO:" + "".join(stream.push(t) for t in full[len(prompt) :]) == "ROMEO: the king"


def test_streamed_text_waits_for_whole_characters():
    from transformer.generate import TextStream
    from transformer.tokenizers import BPETokenizer

    tok = BPETokenizer.train_bytes(["abc"] * 10, vocab_size=260)  # "é" and "✓" stay split into their bytes
    ids = tok.encode("é ✓")
    assert len(ids) == 6
    stream = TextStream(tok, [])
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == "é ✓" and not any("\ufffd" in p for p in pieces)
    assert pieces[0] == "" and pieces[1] == "é"  # the first byte alone is not a character yet


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_finds_the_best_sequence_when_the_beam_holds_them_all(length_penalty):
    """On a 6-token vocabulary and 3 tokens at most, a beam of 125 keeps every hypothesis: beam search must
    return the sequence a brute-force search over all 156 finds (score = log-probability including </s>,
    divided by length ** length_penalty, the length counting </s>), and a narrow beam can only do worse."""
    from transformer.tokenizers import EOS

    src = torch.tensor([[4, 5, 4], [5, 5, 0]])
    tokens = [t for t in range(6) if t != EOS]
    for seed in range(4):  # several random models: a wrong length normalisation shows in some of them
        model = tiny_model(seed=seed * 100 + int(length_penalty * 10), vocab=6, dropout=0.0)
        _check_beam_against_brute_force(model, src, tokens, length_penalty)


def _check_beam_against_brute_force(model, src, tokens, length_penalty):
    import itertools

    from transformer.tokenizers import EOS

    def score(i, seq):
        with torch.no_grad():
            logp = model(src[i : i + 1], torch.tensor([[1, *seq]])).log_softmax(-1)[0]
        picked = [logp[j, t] for j, t in enumerate([*seq, EOS])]
        return float(sum(picked)) / (len(seq) + 1) ** length_penalty

    limits = [len([t for t in row if t != 0]) for row in src.tolist()]  # max_len_a=1, max_len_b=0 below
    for i, limit in enumerate(limits):
        candidates = [list(s) for n in range(limit + 1) for s in itertools.product(tokens, repeat=n)]
        best = max(candidates, key=lambda s: score(i, s))
        found = beam_search(model, src, beam_size=5**limit, length_penalty=length_penalty, max_len_a=1, max_len_b=0)
        assert found[i] == best
        narrow = beam_search(model, src, beam_size=2, length_penalty=length_penalty, max_len_a=1, max_len_b=0)
        assert score(i, narrow[i]) <= score(i, best) + 1e-6
