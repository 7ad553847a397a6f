"""transformer.layers: each building block against its formula, written out here by hand.

Tolerances: fp32 results are compared with float64 hand-written references through `helpers.fp32_atol`
(a few units of fp32 rounding, eps = 1.2e-7, per chained reduction, times the largest value); a table of
sines computed in float64 and stored in fp32 is within one fp32 rounding (eps/2 relative, |value| <= 1) of the
exact value. A real bug (a wrong frequency, a swapped norm, a future token attended to) is orders larger.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import FP32_EPS, fp32_atol
from transformer import ModelConfig
from transformer.attention import KVCache, causal_mask, padding_mask
from transformer.errors import TransformerError
from transformer.layers import (
    ACTIVATIONS,
    FeedForward,
    LearnedPositionalEncoding,
    SinusoidalPositionalEncoding,
    TokenEmbedding,
    TransformerLayer,
    positional_encoding,
    residual_connection,
)

D, H = 16, 2


# ----------------------------------------------------------------------------------------------------------
# Embeddings and positions


def test_token_embedding_pad_row_is_zero_and_output_is_scaled():
    torch.manual_seed(0)
    emb = TokenEmbedding(11, D, pad_id=3)
    assert torch.count_nonzero(emb.weight[3]) == 0
    assert emb.weight is emb.embedding.weight
    ids = torch.tensor([[1, 3, 10], [3, 0, 5]])
    out = emb(ids)
    assert out.shape == (2, 3, D)
    assert torch.equal(out, emb.weight[ids] * math.sqrt(D))  # the same one multiplication: exactly equal
    assert torch.count_nonzero(out[0, 1]) == 0 and torch.count_nonzero(out[1, 0]) == 0
    unscaled = TokenEmbedding(11, D, pad_id=3, scale=False)
    assert torch.equal(unscaled(ids), unscaled.weight[ids])


def test_the_pad_row_gets_no_gradient():
    torch.manual_seed(0)
    emb = TokenEmbedding(7, D, pad_id=0)
    emb(torch.tensor([[0, 1, 0, 2]])).pow(2).sum().backward()
    grad = emb.weight.grad
    assert torch.count_nonzero(grad[0]) == 0
    assert torch.count_nonzero(grad[1]) > 0 and torch.count_nonzero(grad[2]) > 0


def sinusoid(pos: int, j: int, d: int) -> float:
    """The paper's formula, in Python's float64: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos."""
    i = j // 2
    angle = pos / 10000 ** (2 * i / d)
    return math.sin(angle) if j % 2 == 0 else math.cos(angle)


@pytest.mark.parametrize("d", [16, 7])  # an odd width too: one more sine than cosines
def test_sinusoidal_encoding_is_the_formula_and_grows_past_its_initial_table(d):
    pe = SinusoidalPositionalEncoding(d)
    assert pe.table.shape == (64, d)
    T = 150
    out = pe(torch.zeros(2, T, d))  # longer than the initial 64 rows
    assert pe.table.size(0) >= T
    expected = torch.tensor([[sinusoid(p, j, d) for j in range(d)] for p in range(T)], dtype=torch.float64)
    # the only error is storing the float64 value in fp32: half an fp32 unit of rounding, |value| <= 1
    assert torch.allclose(out[0].double(), expected, rtol=0, atol=FP32_EPS)
    assert torch.equal(out[0], out[1])
    # with an offset (decoding step by step): the rows of positions offset .. offset + T - 1
    x = torch.randn(1, 5, d)
    assert torch.equal(pe(x, offset=140), x + pe.table[140:145])


def test_the_table_grows_to_what_is_needed_even_from_an_offset():
    pe = SinusoidalPositionalEncoding(D)
    small = pe(torch.zeros(1, 10, D))
    out = pe(torch.zeros(1, 3, D), offset=300)
    assert pe.table.size(0) >= 303
    expected = torch.tensor([[sinusoid(p, j, D) for j in range(D)] for p in range(300, 303)], dtype=torch.float64)
    assert torch.allclose(out[0].double(), expected, rtol=0, atol=FP32_EPS)
    assert torch.equal(pe(torch.zeros(1, 10, D)), small)  # the regrown table starts the same


def test_sinusoidal_keeps_the_input_dtype():
    pe = SinusoidalPositionalEncoding(D)
    assert pe(torch.zeros(1, 4, D, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_halves_layout_is_a_permutation_of_the_interleaved_one():
    x = torch.zeros(1, 100, D)
    interleaved = SinusoidalPositionalEncoding(D)(x)[0]
    halves = SinusoidalPositionalEncoding(D, halves=True)(x)[0]
    assert not torch.equal(interleaved, halves)
    assert torch.equal(halves[:, : D // 2], interleaved[:, 0::2])  # all the sines
    assert torch.equal(halves[:, D // 2 :], interleaved[:, 1::2])  # then all the cosines
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    assert torch.equal(interleaved[:, perm], halves)


def test_learned_positions_add_their_rows_and_refuse_longer_inputs():
    torch.manual_seed(0)
    pe = LearnedPositionalEncoding(8, D)
    x = torch.randn(2, 8, D)
    assert torch.equal(pe(x), x + pe.embedding.weight)
    assert torch.equal(pe(x[:, :3], offset=5), x[:, :3] + pe.embedding.weight[5:8])
    with pytest.raises(TransformerError, match=r"a sequence of 9 positions .*\(max_positions=8\)"):
        pe(torch.zeros(1, 9, D))
    with pytest.raises(TransformerError, match="max_positions=8"):
        pe(torch.zeros(1, 2, D), offset=7)


def test_positional_encoding_follows_the_config():
    assert isinstance(positional_encoding(ModelConfig(d_model=D, n_heads=H)), SinusoidalPositionalEncoding)
    halves = positional_encoding(ModelConfig(d_model=D, n_heads=H, positional="sinusoidal_halves"))
    assert isinstance(halves, SinusoidalPositionalEncoding) and halves.halves
    learned = positional_encoding(ModelConfig(d_model=D, n_heads=H, positional="learned", max_positions=12))
    assert isinstance(learned, LearnedPositionalEncoding) and learned.embedding.weight.shape == (12, D)


# ----------------------------------------------------------------------------------------------------------
# Feed-forward and the residual rule


def linear64(x, lin):
    return F.linear(x.double(), lin.weight.double(), lin.bias.double())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_feed_forward_is_linear_activation_linear_per_position(activation):
    torch.manual_seed(0)
    ff = FeedForward(D, 24, dropout=0.0, activation=activation).eval()
    x = torch.randn(3, 5, D)
    out = ff(x)
    act = {
        "relu": torch.relu,
        "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
        "gelu_tanh": lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))),
        "silu": lambda t: t * torch.sigmoid(t),
    }[activation]
    expected = linear64(act(linear64(x, ff.linear1)), ff.linear2)
    assert torch.allclose(out.double(), expected, rtol=0, atol=fp32_atol(expected, 2))
    # each position on its own: the same as the position alone, and unchanged by the other positions
    for b in range(3):
        for t in range(5):
            alone = ff(x[b : b + 1, t : t + 1])[0, 0]
            assert torch.allclose(alone, out[b, t], rtol=0, atol=fp32_atol(out, 2))
    other = x.clone()
    other[:, 1:] = torch.randn(3, 4, D)
    assert torch.allclose(ff(other)[:, 0], out[:, 0], rtol=0, atol=fp32_atol(out, 2))


def test_feed_forward_dropout_acts_in_training_only():
    torch.manual_seed(0)
    ff = FeedForward(D, 64, dropout=0.5, activation="relu")
    x = torch.randn(2, 4, D)
    eval_out = ff.eval()(x)
    assert torch.equal(ff(x), eval_out)  # deterministic in eval mode
    assert not torch.allclose(ff.train()(x), eval_out)


def test_residual_connection_rule():
    x = torch.tensor([1.0, -2.0, 3.0])
    norm = lambda t: 3 * t + 1  # noqa: E731 - not a real norm: any function shows where it is applied
    f = lambda h: h**2  # noqa: E731
    add = lambda h, r: r + f(h)  # noqa: E731
    assert torch.equal(residual_connection(x, norm, add, norm_first=True), x + f(norm(x)))  # pre-norm
    assert torch.equal(residual_connection(x, norm, add, norm_first=False), norm(x + f(x)))  # post-norm


# ----------------------------------------------------------------------------------------------------------
# The Transformer layer against a hand-written computation


def layer_config(norm_first: bool, **kw) -> ModelConfig:
    return ModelConfig(**{**dict(d_model=D, n_heads=H, d_ff=24, dropout=0.0, norm_first=norm_first), **kw})


def random_layer(norm_first: bool, cross: bool, seed: int = 0, **kw) -> TransformerLayer:
    torch.manual_seed(seed)
    layer = TransformerLayer(layer_config(norm_first, **kw), cross_attention=cross).eval()
    with torch.no_grad():  # random LayerNorms and biases (they start at 1 and 0), so a swapped one shows
        for name, p in layer.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3)
    return layer


def layer_norm64(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def mha64(x, kv, attn, allowed=None):
    """Multi-head attention written out, float64: x (B, T, E) queries, kv (B, S, E) keys/values; allowed
    broadcasts to (B, H, T, S), True = may attend."""
    B, T, E = x.shape
    S = kv.size(1)
    if attn.cross:
        q = linear64(x, attn.q_proj)
        k, v = linear64(kv, attn.kv_proj).split(E, dim=-1)
    else:
        q, k, v = linear64(x, attn.qkv_proj).split(E, dim=-1)
    d = E // attn.n_heads
    q, k, v = (t.reshape(B, -1, attn.n_heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, -1) @ v  # (B, H, T, d)
    assert out.shape == (B, attn.n_heads, T, d) and k.shape[2] == S
    return linear64(out.transpose(1, 2).reshape(B, T, E), attn.out_proj)


def reference_layer(layer, x, memory=None, self_allowed=None, memory_allowed=None):
    """The layer's formula, by hand, in float64."""
    x = x.double()
    memory = memory.double() if memory is not None else None

    def ff(h):
        return linear64(torch.relu(linear64(h, layer.ff.linear1)), layer.ff.linear2)

    sublayers = [(layer.self_attn_norm, lambda h: mha64(h, h, layer.self_attn, self_allowed))]
    if layer.cross_attn is not None:
        sublayers.append((layer.cross_attn_norm, lambda h: mha64(h, memory, layer.cross_attn, memory_allowed)))
    sublayers.append((layer.ff_norm, ff))
    for norm, f in sublayers:
        if layer.norm_first:
            x = x + f(layer_norm64(x, norm))  # pre-norm: x + f(norm(x))
        else:
            x = layer_norm64(x + f(x), norm)  # post-norm: norm(x + f(x))
    return x


DEPTH = 4 * 3 + 1  # three sublayers of about four chained reductions each (see helpers.model_depth)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_decoder_layer_equals_the_hand_written_computation(norm_first):
    layer = random_layer(norm_first, cross=True)
    g = torch.Generator().manual_seed(1)
    x, memory = torch.randn(2, 5, D, generator=g), torch.randn(2, 7, D, generator=g)
    src = torch.tensor([[4, 5, 6, 7, 8, 0, 0], [4, 5, 6, 7, 8, 9, 10]])  # the first source is padded
    memory_mask = padding_mask(src, 0)
    out = layer(x, is_causal=True, memory=memory, memory_mask=memory_mask)
    expected = reference_layer(layer, x, memory, causal_mask(5), memory_mask)
    assert torch.allclose(out.double(), expected, rtol=0, atol=fp32_atol(expected, DEPTH))
    # and the two placements really differ (the test would not notice a swapped flag otherwise)
    layer.norm_first = not norm_first
    assert not torch.allclose(layer(x, is_causal=True, memory=memory, memory_mask=memory_mask), out, atol=1e-3)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_equals_the_hand_written_computation(norm_first):
    layer = random_layer(norm_first, cross=False, activation="relu")
    assert layer.cross_attn is None and layer.cross_attn_norm is None
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(2))
    mask = padding_mask(torch.tensor([[5, 5, 5, 5, 0, 0], [5, 5, 5, 5, 5, 5]]), 0)
    out = layer(x, mask=mask)
    expected = reference_layer(layer, x, self_allowed=mask)
    assert torch.allclose(out.double(), expected, rtol=0, atol=fp32_atol(expected, DEPTH))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("how", ["is_causal", "mask"])
def test_causal_masking_keeps_each_position_independent_of_later_ones(norm_first, how):
    layer = random_layer(norm_first, cross=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, D, generator=g)
    kw = dict(is_causal=True) if how == "is_causal" else dict(mask=causal_mask(8))
    out = layer(x, **kw)
    atol = fp32_atol(out, DEPTH)
    for t in range(7):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn(1, 7 - t, D, generator=g)
        assert torch.allclose(layer(changed, **kw)[:, : t + 1], out[:, : t + 1], rtol=0, atol=atol), t
    # while a change at position 0 does reach every later position (the test is not vacuous)
    changed = x.clone()
    changed[:, 0] += torch.randn(D, generator=g)  # not a constant shift, which a pre-norm LayerNorm removes
    moved = (layer(changed, **kw) - out).abs().amax(-1)[0]
    assert bool((moved > 100 * atol).all())


def test_attention_maps_are_recorded_causal_and_normalised():
    layer = random_layer(False, cross=True)
    g = torch.Generator().manual_seed(4)
    x, memory = torch.randn(2, 4, D, generator=g), torch.randn(2, 3, D, generator=g)
    memory_mask = padding_mask(torch.tensor([[5, 5, 0], [5, 5, 5]]), 0)
    maps = []
    with_maps = layer(x, is_causal=True, memory=memory, memory_mask=memory_mask, attn_maps=maps)
    without = layer(x, is_causal=True, memory=memory, memory_mask=memory_mask)
    assert torch.allclose(with_maps, without, rtol=0, atol=fp32_atol(without, DEPTH))
    (record,) = maps
    self_w, cross_w = record["self"], record["cross"]
    assert self_w.shape == (2, H, 4, 4) and cross_w.shape == (2, H, 4, 3)
    assert torch.count_nonzero(self_w.triu(1)) == 0  # no weight on a later position
    assert torch.count_nonzero(cross_w[0, :, :, 2]) == 0  # none on the padded source token
    for w in (self_w, cross_w):
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), rtol=0, atol=8 * FP32_EPS)


def test_step_by_step_decoding_with_caches_equals_the_full_causal_pass():
    layer = random_layer(True, cross=True)
    g = torch.Generator().manual_seed(5)
    x, memory = torch.randn(2, 6, D, generator=g), torch.randn(2, 4, D, generator=g)
    full = layer(x, is_causal=True, memory=memory)
    cache = (KVCache(capacity=2), KVCache(static=True))  # a small capacity: the buffer must grow
    steps = [layer(x[:, t : t + 1], memory=memory, cache=cache) for t in range(6)]
    assert cache[0].length == 6
    assert torch.allclose(torch.cat(steps, 1), full, rtol=0, atol=fp32_atol(full, DEPTH))


def test_layer_dropout_acts_in_training_only():
    torch.manual_seed(0)
    layer = TransformerLayer(layer_config(False, dropout=0.3), cross_attention=False)
    x = torch.randn(1, 5, D)
    eval_out = layer.eval()(x)
    assert torch.equal(layer(x), eval_out)
    assert not torch.allclose(layer.train()(x), eval_out)
