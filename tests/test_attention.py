import pytest
import torch
from torch import nn

from helpers import fp32_atol
from transformer.attention import (
    KVCache,
    MultiHeadAttention,
    attention,
    attention_reference,
    causal_mask,
    padding_mask,
)


def qkv(B=2, H=3, T=5, S=7, D=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g, dtype=dtype) for n in (T, S, S))


def test_reference_weights_are_a_distribution_and_respect_the_mask():
    q, k, v = qkv()
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    out, w = attention_reference(q, k, v, mask)
    assert torch.allclose(w.sum(-1), torch.ones(2, 3, 5))
    assert (w.masked_select(~mask.expand_as(w)) == 0).all()
    assert torch.allclose(out, w @ v, atol=1e-6)


@pytest.mark.parametrize("kind", ["none", "padding", "causal", "random"])
def test_fused_path_equals_six_step_reference(kind):
    q, k, v = qkv(T=6, S=6)
    mask, is_causal = None, False
    if kind == "padding":
        ids = torch.tensor([[5, 6, 7, 8, 0, 0], [1, 2, 3, 4, 5, 6]])
        mask = padding_mask(ids, 0)
    elif kind == "causal":
        is_causal = True
    elif kind == "random":
        mask = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.5
    ref, _ = attention_reference(q, k, v, causal_mask(6) if is_causal else mask)
    fused, w = attention(q, k, v, mask, is_causal=is_causal)
    assert w is None
    tol = fp32_atol(ref, 3)  # two products and a softmax
    torch.testing.assert_close(fused, ref, atol=tol, rtol=0)
    # asking for weights goes through the reference and returns the same output
    out, w = attention(q, k, v, mask, is_causal=is_causal, need_weights=True)
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)
    assert w.shape == (2, 3, 6, 6)


def test_causal_mask_with_cached_keys():
    m = causal_mask(2, keys=5)[0, 0]
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


@pytest.mark.parametrize("autocast", [False, True])
def test_fully_masked_row_is_finite(autocast):
    q, k, v = qkv()
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, :, 2] = False  # query 2 of the first sentence may attend to nothing
    mask[1] = False  # a sentence that is all padding
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for need in (False, True):
            out, _ = attention(q, k, v, mask, need_weights=need)
            assert torch.isfinite(out).all()
    mha = MultiHeadAttention(12, 3).eval()
    x = torch.randn(2, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, _ = mha(x, mask=padding_mask(torch.zeros(2, 5, dtype=torch.long), 0))
    assert torch.isfinite(y).all()


def test_gradcheck_attention_float64():
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, T=3, S=4, D=3, dtype=torch.float64))
    mask = torch.tensor([[[[True, True, True, False]]]])
    assert torch.autograd.gradcheck(lambda a, b, c: attention_reference(a, b, c, mask)[0], (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, mask)[0], (q, k, v))


def copy_to_torch_mha(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(ours.d_model, ours.n_heads, batch_first=True)
    with torch.no_grad():
        if ours.cross:
            ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.kv_proj.weight]))
            ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.kv_proj.bias]))
        else:
            ref.in_proj_weight.copy_(ours.qkv_proj.weight)
            ref.in_proj_bias.copy_(ours.qkv_proj.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref.eval()


def test_self_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiHeadAttention(16, 4).eval()
    nn.init.normal_(ours.qkv_proj.bias)
    ref = copy_to_torch_mha(ours)
    x = torch.randn(3, 6, 16)
    ids = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    out, _ = ours(x, mask=padding_mask(ids, 0))
    want, _ = ref(x, x, x, key_padding_mask=ids == 0, need_weights=False)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    # weights from the reference path equal torch's (averaged over heads there)
    _, w = ours(x, mask=padding_mask(ids, 0), need_weights=True)
    _, want_w = ref(x, x, x, key_padding_mask=ids == 0, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(w, want_w, atol=1e-5, rtol=0)


def test_cross_attention_equals_torch_multihead_attention():
    torch.manual_seed(1)
    ours = MultiHeadAttention(16, 2, cross=True).eval()
    nn.init.normal_(ours.kv_proj.bias)
    nn.init.normal_(ours.q_proj.bias)
    ref = copy_to_torch_mha(ours)
    x, mem = torch.randn(2, 4, 16), torch.randn(2, 7, 16)
    src = torch.tensor([[3] * 7, [3] * 5 + [0] * 2])
    out, _ = ours(x, mem, padding_mask(src, 0))
    want, _ = ref(x, mem, mem, key_padding_mask=src == 0, need_weights=False)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_kv_cache_grows_and_reorders():
    cache = KVCache(capacity=2)
    ks = [torch.randn(3, 2, 1, 4) for _ in range(5)]
    for i, k in enumerate(ks):
        all_k, _ = cache.append(k, k + 1)
        assert all_k.shape == (3, 2, i + 1, 4)
    torch.testing.assert_close(all_k, torch.cat(ks, dim=2))
    cache.reorder(torch.tensor([2, 0]))
    k, v = cache.append(ks[0][:2], ks[0][:2])
    torch.testing.assert_close(k[:, :, :5], torch.cat(ks, dim=2)[[2, 0]])


def test_dropout_rate_scale_and_every_lane_unbiased():
    from transformer.attention import dropout

    torch.manual_seed(0)
    x = torch.ones(4, 250_001)  # odd size: the last int64 draw is only partly used
    for p in (0.1, 0.3):
        y = dropout(x, p)
        values = y.unique()
        assert values.numel() == 2 and values[0] == 0 and abs(values[1].item() - 1 / (1 - p)) < 1e-6
        zero = (y == 0).flatten().float()
        assert abs(zero.mean().item() - p) < 3e-3
        # 16 bits per element come from four lanes of each 64-bit draw: each lane must drop at rate p
        lanes = zero[: zero.numel() // 4 * 4].view(-1, 4).mean(0)
        assert (lanes - p).abs().max().item() < 5e-3, lanes
        assert abs(y.mean().item() - 1.0) < 5e-3  # inverted dropout keeps the expectation
    assert dropout(x, 0.0) is x
    # a bf16 tensor stays bf16 and is scaled in its own dtype
    assert dropout(x.bfloat16(), 0.1).dtype == torch.bfloat16
