"""Scaled dot-product attention, multi-head attention and the key/value cache.

The mask convention, used everywhere in the package: a boolean tensor that broadcasts to (B, H, T, S),
**True = this query may attend to this key**. `padding_mask` and `causal_mask` build the two kinds; combine
them with `&`. A query row with no key allowed (e.g. a source that is all padding) yields zeros, never NaN.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cpu.linear import Linear
from .dropout import dropout
from .rope import apply_rotary

# ----------------------------------------------------------------------------------------------------------
# Masks


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(B, S) token ids -> (B, 1, 1, S) mask: every query may attend to every non-pad key."""
    return (ids != pad_id)[:, None, None, :]


def causal_mask(size: int, device: torch.device | None = None, keys: int | None = None) -> Tensor:
    """(1, 1, T, S) mask: query t may attend to keys <= t. With `keys` = S > T, the T queries are the last T
    of S positions (decoding T new tokens after S - T cached ones)."""
    keys = size if keys is None else keys
    return torch.ones(size, keys, dtype=torch.bool, device=device).tril(keys - size)[None, None]


# ----------------------------------------------------------------------------------------------------------
# Attention itself


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, dropout_p: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The six steps of self-attention, written out. Returns (output, weights).

    q: (B, H, T, D); k, v: (B, H_kv, S, D), H_kv dividing H (grouped-query attention: each key/value head
    serves H / H_kv query heads); mask broadcasts to (B, H, T, S), True = may attend.
    Step 1 (making q, k, v from the input) is the projections in `MultiHeadAttention`.
    """
    k, v = _share_kv_heads(q, k, v)
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1)  # step 2: dot products of each query with every key   (B, H, T, S)
    scores = scores / math.sqrt(d_k)  # step 3: scale by sqrt(d_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # step 4: softmax over the keys
    if mask is not None:
        # A row with every key masked is all NaN after softmax; give it zero weight instead.
        weights = weights.masked_fill(~mask, 0.0)
    weights = dropout(weights, dropout_p)
    # Steps 5 and 6: multiply each V by its weight and sum over the keys: that is one matrix product.
    out = weights @ v  # (B, H, T, S) @ (B, H, S, D) -> (B, H, T, D)
    return out, weights


def _share_kv_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """k, v with each of their H_kv heads repeated for the H / H_kv query heads it serves (a copy: the fused
    kernel avoids it where this torch has `enable_gqa`)."""
    groups = q.size(1) // k.size(1)
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _use_matmul_path(q: Tensor, k: Tensor) -> bool:
    # For bf16 on CPU the fused kernel, forward and backward, is slower than plain matrix products at the
    # lengths of sentences (<= 256 keys; `python -m bench train-small` measures the difference). fp32 and long
    # sequences stay on the fused kernel.
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.size(-2) <= 256


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    need_weights: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Attention by the fused kernel (`F.scaled_dot_product_attention`), or by the six-step reference when
    the weights are wanted (or where the reference's matrix products are measured faster: bf16 on CPU).
    Same arguments as `attention_reference`; `is_causal` adds the causal mask. Returns (out, weights or None)."""
    if need_weights or _use_matmul_path(q, k):
        if is_causal:
            c = causal_mask(q.size(-2), q.device, keys=k.size(-2))
            mask = c if mask is None else mask & c
        out, weights = attention_reference(q, k, v, mask, dropout_p)
        return out, (weights if need_weights else None)
    gqa = {}
    if k.size(1) != q.size(1):
        if _HAS_ENABLE_GQA:
            gqa = {"enable_gqa": True}  # the kernel reads each key/value head for its group of query heads
        else:  # pragma: no cover - torch < 2.5
            k, v = _share_kv_heads(q, k, v)
    # cuDNN's kernel (picked for bf16 by recent torch) builds a plan for every new shape: decoding, whose shapes
    # change at every step, would spend most of its time building plans (docs/decoding.md).
    backends = sdpa_kernel(_NOT_CUDNN) if q.is_cuda and _NOT_CUDNN is not None else contextlib.nullcontext()
    with backends:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, **gqa)
    return out, None


_HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


try:  # every fused backend but cuDNN's, where this torch knows them
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _NOT_CUDNN: Optional[list] = [
        b
        for b in (getattr(SDPBackend, n, None) for n in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"))
        if b is not None
    ]
except ImportError:  # pragma: no cover - torch < 2.3
    _NOT_CUDNN = None


# ----------------------------------------------------------------------------------------------------------
# Key/value cache for incremental decoding


class KVCache:
    """Keys and values of one attention layer, kept across decoding steps.

    Self-attention appends each step's keys/values into a pre-allocated buffer that doubles when full;
    cross-attention stores the source's keys/values once (`static`). `reorder` selects batch rows, for beam
    search and for dropping finished sentences.
    """

    def __init__(self, capacity: int = 64, static: bool = False) -> None:
        self.capacity = capacity
        self.static = static
        self.k: Optional[Tensor] = None  # (B, H, capacity, D), or (B, H, S, D) when static
        self.v: Optional[Tensor] = None
        self._spare_k: Optional[Tensor] = None  # the other half of a double buffer, for `reorder`
        self._spare_v: Optional[Tensor] = None
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add (B, H, t, D) keys/values; return all of them so far, (B, H, length, D)."""
        t = k.size(2)
        if self.k is None:
            B, H, _, D = k.shape
            cap = max(self.capacity, t)
            self.k = k.new_empty(B, H, cap, D)
            self.v = v.new_empty(B, H, cap, D)
        elif self.length + t > self.k.size(2):
            cap = max(2 * self.k.size(2), self.length + t)
            self.k = _grow(self.k, cap, self.length)
            self.v = _grow(self.v, cap, self.length)
        self.k[:, :, self.length : self.length + t] = k
        self.v[:, :, self.length : self.length + t] = v
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (the buffer stays; later appends overwrite them)."""
        self.length = min(self.length, length)

    def regrid(self, parts: list[tuple["KVCache", int, Optional[Tensor]]], length: int, capacity: int) -> None:
        """Rebuild these buffers from parts (cache, n, rows): the last n positions of that cache's `rows` (None:
        all), stacked in order and right-aligned to end at `length`, with room for `capacity` positions
        (continuous batching: `DecoderCache.join`). Positions before a row's own are zeros (finite: masked,
        they still meet a softmax weight of 0)."""
        blocks = []
        for c, n, rows in parts:
            if c.k is None:
                continue
            k, v = c.k[:, :, c.length - n : c.length], c.v[:, :, c.length - n : c.length]
            blocks.append((k, v) if rows is None else (k.index_select(0, rows), v.index_select(0, rows)))
        self._spare_k = self._spare_v = None
        if not blocks or not sum(k.size(0) for k, _ in blocks):
            self.k = self.v = None
            self.length = 0
            return
        first = blocks[0][0]
        shape = (sum(k.size(0) for k, _ in blocks), first.size(1), capacity, first.size(3))
        self.k, self.v, self.length = first.new_zeros(shape), first.new_zeros(shape), length
        row = 0
        for k, v in blocks:
            b, n = k.size(0), k.size(2)
            self.k[row : row + b, :, length - n : length] = k
            self.v[row : row + b, :, length - n : length] = v
            row += b

    def set(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v, self.length = k, v, k.size(2)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (in that order): beams that survive, sentences still decoding."""
        if self.k is None:
            return
        if self.static:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
            return
        # Copy only the filled positions, into a second buffer kept from the last reorder (beam search
        # reorders at every step: copying whole buffers there was a fifth of the decoding time).
        k = _gather_rows(self.k, index, self.length, self._spare_k)
        v = _gather_rows(self.v, index, self.length, self._spare_v)
        self._spare_k, self._spare_v, self.k, self.v = self.k, self.v, k, v


def _gather_rows(buf: Tensor, index: Tensor, length: int, spare: Optional[Tensor]) -> Tensor:
    """Rows `index` of buf[:, :, :length], written into `spare` when it has the right shape."""
    shape = (index.numel(), *buf.shape[1:])
    if spare is None or spare.shape != shape:
        spare = buf.new_empty(shape)
    torch.index_select(buf[:, :, :length], 0, index, out=spare[:, :, :length])
    return spare


def _grow(x: Tensor, capacity: int, length: int) -> Tensor:
    out = x.new_empty(x.size(0), x.size(1), capacity, x.size(3))
    out[:, :, :length] = x[:, :, :length]
    return out


# ----------------------------------------------------------------------------------------------------------
# Multi-head attention


class MultiHeadAttention(nn.Module):
    """Multi-head attention with fused projections.

    Self-attention (`cross=False`) projects q, k, v with one matrix (E -> (H + 2 H_kv) D); cross-attention
    projects q from the decoder with one matrix and k, v from the encoder output ("memory") with one fused
    matrix. Each head attends in its own D-dimensional subspace; an output projection mixes the heads.

    Args:
        d_model, n_heads: E and H; D = E / H unless `head_dim` says otherwise.
        n_kv_heads: H_kv key/value heads, each shared by H / H_kv query heads (grouped-query attention; None:
            H). A KV cache holds only these.
        qkv_bias, out_bias: biases on the q/k/v projection and on the output projection.
        qk_norm: a module applied to each head's queries and keys (Qwen3's RMSNorm), None for none.
    `forward(..., rotary=(cos, sin))` rotates queries and keys by their positions (rope.py) before they meet,
    and before keys enter the cache.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        cross: bool = False,
        n_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        qk_norm: Optional[Callable[[], nn.Module]] = None,
    ) -> None:
        super().__init__()
        if head_dim is None and d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.head_dim = d_model // n_heads if head_dim is None else head_dim
        self.dropout = dropout
        self.cross = cross
        q_width, kv_width = n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split = (q_width, kv_width, kv_width)  # the fused projection's output: queries, keys, values
        if cross:
            self.q_proj = Linear(d_model, q_width, bias=qkv_bias)
            self.kv_proj = Linear(d_model, 2 * kv_width, bias=qkv_bias)
        else:
            self.qkv_proj = Linear(d_model, q_width + 2 * kv_width, bias=qkv_bias)
        self.out_proj = Linear(q_width, d_model, bias=out_bias)
        self.q_norm = qk_norm() if qk_norm is not None else None
        self.k_norm = qk_norm() if qk_norm is not None else None

    def _heads(self, x: Tensor, n_heads: int, norm: Optional[nn.Module] = None) -> Tensor:
        B, T, _ = x.shape  # (B, T, n_heads * D) -> (B, n_heads, T, D)
        x = x.view(B, T, n_heads, self.head_dim)
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        memory: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        is_causal: bool = False,
        cache: Optional[KVCache] = None,
        need_weights: bool = False,
        rotary: Optional[tuple[Tensor, Tensor]] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """x: (B, T, E) queries (and keys/values for self-attention); memory: (B, S, E) for cross-attention;
        rotary: (cos, sin) of the T positions of x. Returns the (B, T, E) output and, if `need_weights`, the
        (B, H, T, S) attention weights."""
        B, T, E = x.shape
        H, H_kv = self.n_heads, self.n_kv_heads
        if self.cross:
            q = self._heads(self.q_proj(x), H, self.q_norm)
            if cache is not None and cache.k is not None:
                k, v = cache.k, cache.v  # the source's keys/values, computed on the first step
            else:
                k, v = self.kv_proj(memory).split(self.split[1:], dim=-1)
                k, v = self._heads(k, H_kv, self.k_norm), self._heads(v, H_kv)
                if cache is not None:
                    cache.set(k, v)
        else:
            q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
            q, k, v = self._heads(q, H, self.q_norm), self._heads(k, H_kv, self.k_norm), self._heads(v, H_kv)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            if cache is not None:
                k, v = cache.append(k, v)
        dropout_p = self.dropout if self.training else 0.0
        out, weights = attention(q, k, v, mask, dropout_p, is_causal, need_weights)
        out = out.transpose(1, 2).reshape(B, T, H * self.head_dim)  # (B, H, T, D) -> (B, T, H * D)
        return self.out_proj(out), weights
