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
def test_a_query_with_no_key_allowed_gets_zeros(autocast):
    q, k, v = qkv()
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, :, 2] = False  # query 2 of the first sentence may attend to nothing
    mask[1] = False  # a sentence that is all padding
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for need in (False, True):
            out, _ = attention(q, k, v, mask, need_weights=need)
            assert torch.isfinite(out).all()
            assert (out[0, :, 2] == 0).all() and (out[1] == 0).all()  # zeros, as docs/architecture.md promises
            assert (out[0, :, [0, 1, 3, 4]] != 0).any()  # and the others are not
    mha = MultiHeadAttention(12, 3).eval()
    x = torch.randn(2, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, _ = mha(x, mask=padding_mask(torch.zeros(2, 5, dtype=torch.long), 0))
    # no key: the heads give zeros, so the layer gives its output projection's bias at every position
    torch.testing.assert_close(
        y.float(), mha.out_proj.bias.expand(2, 5, 12).float(), atol=1e-2 if autocast else 0, rtol=0
    )


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
        all_k, all_v = cache.append(k, k + 1)
        assert all_k.shape == all_v.shape == (3, 2, i + 1, 4)  # grew past its capacity of 2
    keys = torch.cat(ks, dim=2)
    torch.testing.assert_close(all_k, keys)
    torch.testing.assert_close(all_v, keys + 1)
    cache.reorder(torch.tensor([2, 0]))
    new = torch.randn(2, 2, 1, 4)
    k, v = cache.append(new, new - 1)
    torch.testing.assert_close(k, torch.cat([keys[[2, 0]], new], dim=2))
    torch.testing.assert_close(v, torch.cat([keys[[2, 0]] + 1, new - 1], dim=2))
    cache.reorder(torch.tensor([1, 1, 0]))  # a second reorder, through the reused spare buffer; rows repeat
    k, v = cache.append(new[[0, 0, 1]], new[[0, 0, 1]])
    want = torch.cat([keys[[0, 0, 2]], new[[1, 1, 0]], new[[0, 0, 1]]], dim=2)
    torch.testing.assert_close(k, want)
    torch.testing.assert_close(v[:, :, :5], keys[[0, 0, 2]] + 1)


def test_bf16_matmul_path_equals_the_fused_kernel():
    """On the CPU, bf16 attention runs as the six-step products (faster there than the fused kernel): its
    output and gradients agree with the fused kernel's in bf16 and with fp32 within bf16 rounding."""
    import torch.nn.functional as F

    from transformer.attention import _use_matmul_path

    q, k, v = qkv(T=6, S=6)
    mask = padding_mask(torch.tensor([[5, 6, 7, 8, 0, 0], [1, 2, 3, 4, 5, 6]]), 0)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    assert _use_matmul_path(qb, kb)
    out, _ = attention(qb, kb, vb, mask)
    q2, k2, v2 = (t.bfloat16().requires_grad_() for t in (q, k, v))
    fused = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask)
    ref, _ = attention_reference(q, k, v, mask)
    # bf16 keeps 8 significant bits: 2^-8 relative per rounding, a few roundings deep
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), fused.float(), atol=3e-2, rtol=3e-2)
    g = torch.randn_like(out)
    out.backward(g)
    fused.backward(g)
    for a, b in ((qb, q2), (kb, k2), (vb, v2)):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=5e-2, rtol=5e-2)
