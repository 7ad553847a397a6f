"""Property-based tests (hypothesis): tokenizer round trips, padding invariance, beam length limits."""

import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import fp32_atol, model_depth, tiny_model
from transformer.batching import pad_batch
from transformer.generate import beam_search, greedy
from transformer.tokenizers import EOS, BPETokenizer, CharTokenizer

TRAIN_TEXT = [
    "Ein Hund läuft über die Wiese.",
    "A dog runs across the meadow!",
    "Zwei Kinder spielen im Schnee, 3x.",
] * 20


@functools.lru_cache(maxsize=None)
def byte_bpe():
    return BPETokenizer.train_bytes(TRAIN_TEXT, vocab_size=400)


@functools.lru_cache(maxsize=None)
def word_bpe():
    return BPETokenizer.train(TRAIN_TEXT, vocab_size=200)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_bpe_round_trips_any_unicode(text):
    tok = byte_bpe()
    ids = tok.encode(text)
    assert all(4 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_char_tokenizer_round_trip_drops_only_unseen_characters(text):
    tok = CharTokenizer.train(TRAIN_TEXT)
    known = set(tok.chars)
    assert tok.decode(tok.encode(text)) == "".join(c for c in text if c in known)


WORDS = sorted({w for line in TRAIN_TEXT for w in line.split()})


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12))
def test_word_bpe_round_trips_text_of_its_alphabet(words):
    tok = word_bpe()
    text = " ".join(words)
    assert tok.decode(tok.encode(text)) == text


@functools.lru_cache(maxsize=None)
def small_model():
    return tiny_model(vocab=20, n_encoder_layers=2, n_decoder_layers=2, d_ff=32, dropout=0.0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 9), st.integers(1, 7)), min_size=1, max_size=5),
    st.integers(0, 4),
    st.integers(0, 2**16),
)
def test_batching_and_padding_change_nothing(shapes, extra_pad, seed):
    """Each sentence's logits are the same alone and inside a padded batch of any shape."""
    g = torch.Generator().manual_seed(seed)
    model = small_model()
    pairs = [
        (torch.randint(4, 20, (s,), generator=g).tolist(), torch.randint(4, 20, (t,), generator=g).tolist())
        for s, t in shapes
    ]
    src = pad_batch([s for s, _ in pairs])
    src = torch.cat([src, torch.zeros(len(pairs), extra_pad, dtype=torch.long)], 1)
    tgt = pad_batch([t for _, t in pairs])
    with torch.no_grad():
        batched = model(src, tgt)
        for i, (s, t) in enumerate(pairs):
            alone = model(torch.tensor([s]), torch.tensor([t]))[0]
            torch.testing.assert_close(
                batched[i, : len(t)], alone, atol=fp32_atol(alone, model_depth(model.config)), rtol=0
            )


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(1, 8), min_size=1, max_size=4),
    st.integers(1, 4),
    st.floats(0.0, 2.0),
    st.integers(0, 5),
    st.integers(0, 2**16),
)
def test_decoding_stops_exactly_at_the_maximum_length(lengths, beam, a, b, seed):
    """With </s> made impossible, every output is exactly as long as its limit allows: never longer, never
    cut short (an off-by-one either way fails)."""
    g = torch.Generator().manual_seed(seed)
    model = small_model()
    model.output.register_forward_hook(lambda m, i, logits: logits.index_fill_(-1, torch.tensor([EOS]), -1e9))
    src = pad_batch([torch.randint(4, 20, (n,), generator=g).tolist() for n in lengths])
    limits = [int(n * a) + b for n in lengths]
    for out in (beam_search(model, src, beam, max_len_a=a, max_len_b=b), greedy(model, src, a, b)):
        assert [len(o) for o in out] == limits
