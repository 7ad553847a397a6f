"""The building blocks: embeddings, positional encodings, feed-forward, and the Transformer layer.

One `TransformerLayer` class serves every stack: without cross-attention it is an encoder layer (or, with a
causal mask, a decoder-only language-model layer); with cross-attention it is an encoder-decoder decoder layer.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache, MultiHeadAttention
from .config import ModelConfig
from .cpu.linear import Linear
from .dropout import Dropout
from .errors import TransformerError
from .norms import RMSNorm, norm_layer


class TokenEmbedding(nn.Module):
    """Token ids -> vectors, scaled by sqrt(d_model) so they are not drowned by the positional encoding.

    Args:
        vocab_size, d_model: the table's shape.
        pad_id: the padding token, whose vector is zero and gets no gradient.
        scale: multiply by sqrt(d_model) (False for BERT and GPT-2, which do not).
    Shapes: (B, T) ids -> (B, T, d_model).
    """

    def __init__(self, vocab_size: int, d_model: int, pad_id: int, scale: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embedding.weight[pad_id].zero_()
        self.scale = math.sqrt(d_model) if scale else 1.0

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embedding(ids)  # (B, T) -> (B, T, E)
        return x * self.scale if self.scale != 1.0 else x


class SinusoidalPositionalEncoding(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    `halves=True` puts the same values in another order, all sines then all cosines (Marian's layout:
    PE(pos, i) = sin(pos / 10000^(2i/d)), PE(pos, d/2 + i) = cos(...)). The table is computed on demand and
    grows with the longest sequence seen, so any length works.
    Shapes: (B, T, d_model) -> the same, with PE(offset .. offset + T - 1) added (`offset`: positions already
    cached when decoding step by step).
    """

    def __init__(self, d_model: int, halves: bool = False) -> None:
        super().__init__()
        self.d_model, self.halves = d_model, halves
        self.register_buffer("table", self._make(64), persistent=False)

    def _make(self, length: int) -> Tensor:
        pos = torch.arange(length, dtype=torch.float64)[:, None]
        inv_freq = 10000.0 ** (-torch.arange(0, self.d_model, 2, dtype=torch.float64) / self.d_model)
        sin, cos = torch.sin(pos * inv_freq), torch.cos(pos * inv_freq)[:, : self.d_model // 2]
        table = torch.zeros(length, self.d_model, dtype=torch.float64)
        if self.halves:
            table[:, : sin.size(1)], table[:, sin.size(1) :] = sin, cos
        else:
            table[:, 0::2], table[:, 1::2] = sin, cos
        return table.float()

    def forward(self, x: Tensor, offset: int = 0, positions: Optional[Tensor] = None) -> Tensor:
        """`positions` (B, T), when given, are each token's own position (rows of left-padded prompts start
        at different offsets); else the T tokens take positions offset .. offset + T - 1."""
        end = offset + x.size(1) if positions is None else int(positions.max()) + 1
        if end > self.table.size(0):
            self.table = self._make(max(end, 2 * self.table.size(0))).to(x.device)
        if positions is not None:
            return x + self.table[positions].to(x.dtype)
        return x + self.table[offset:end].to(x.dtype)


class LearnedPositionalEncoding(nn.Module):
    """A trained vector per position, up to `max_positions`; longer inputs are an error.
    Shapes: (B, T, d_model) -> the same, with the vectors of positions offset .. offset + T - 1 added."""

    def __init__(self, max_positions: int, d_model: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_positions, d_model)
        # As large as the sinusoidal encoding (RMS 1/sqrt(2)), since token embeddings are scaled up to ~1: a
        # small init leaves position drowned out (a worse validation loss on the Shakespeare recipe).
        nn.init.normal_(self.embedding.weight, std=2**-0.5)

    def forward(self, x: Tensor, offset: int = 0, positions: Optional[Tensor] = None) -> Tensor:
        end = offset + x.size(1) if positions is None else int(positions.max()) + 1
        if end > self.embedding.num_embeddings:
            raise TransformerError(
                f"a sequence of {end} positions is longer than the learned positional table "
                f"(max_positions={self.embedding.num_embeddings}); shorten the input"
            )
        if positions is not None:
            return x + self.embedding.weight[positions]
        return x + self.embedding.weight[offset:end]


def positional_encoding(cfg: ModelConfig) -> Optional[nn.Module]:
    """The positional encoding `cfg.positional` adds to the input: None for rotary positions, which rotate
    queries and keys inside attention instead (rope.py)."""
    if cfg.positional == "rope":
        return None
    if cfg.positional == "learned":
        return LearnedPositionalEncoding(cfg.max_positions, cfg.d_model)
    return SinusoidalPositionalEncoding(cfg.d_model, halves=cfg.positional == "sinusoidal_halves")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # the exact, erf form (BERT's "gelu")
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),  # GPT-2's "gelu_new"
    "silu": F.silu,  # Marian's "swish"
}


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear(d_model -> d_ff), activation, dropout, Linear(d_ff -> d_model).

    `gated` (SwiGLU with silu, GeGLU with gelu): linear1 makes two d_ff-wide halves, a gate and a value
    (Llama's gate_proj and up_proj, fused into one product); the hidden vector is act(gate) * value.
    Shapes: (B, T, d_model) -> (B, T, d_model), each position on its own."""

    def __init__(
        self, d_model: int, d_ff: int, dropout: float, activation: str, gated: bool = False, bias: bool = True
    ) -> None:
        super().__init__()
        self.gated = gated
        self.linear1 = Linear(d_model, 2 * d_ff if gated else d_ff, bias=bias)
        self.linear2 = Linear(d_ff, d_model, bias=bias)
        self.dropout = Dropout(dropout)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        if self.gated:
            gate, value = h.chunk(2, dim=-1)
            h = self.activation(gate) * value
        else:
            h = self.activation(h)
        return self.linear2(self.dropout(h))


def residual_connection(
    x: Tensor, norm: Callable[[Tensor], Tensor], add: Callable[[Tensor, Tensor], Tensor], norm_first: bool
) -> Tensor:
    """A sublayer's residual connection, normalised where `norm_first` puts it: pre-norm x + f(norm(x)),
    post-norm (the paper) norm(x + f(x)). `add(h, x)` computes x + f(h). The one rule of norm placement: the
    layers and the CPU decoding step (cpu/step.py) both take it from here."""
    if norm_first:
        return add(norm(x), x)
    return norm(add(x, x))


def attention_layer(cfg: ModelConfig, cross: bool = False) -> MultiHeadAttention:
    """The multi-head attention `cfg` describes: heads, key/value heads, head width, biases, QK-norm."""

    def qk_norm() -> nn.Module:  # over each head's D features (Qwen3 normalises queries and keys by RMS)
        return RMSNorm(cfg.head_size, cfg.layer_norm_eps, unit_offset=cfg.norm == "gemma_rmsnorm")

    return MultiHeadAttention(
        cfg.d_model,
        cfg.n_heads,
        cfg.attention_dropout,
        cross=cross,
        n_kv_heads=cfg.kv_heads,
        head_dim=cfg.head_size,
        qkv_bias=cfg.qkv_bias,
        out_bias=cfg.out_bias,
        qk_norm=qk_norm if cfg.qk_norm else None,
    )


class TransformerLayer(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each wrapped in dropout, a residual connection
    and a norm (LayerNorm, or RMSNorm: `cfg.norm`): after the residual (post-norm, the paper) or on the
    sublayer's input (pre-norm).

    Args:
        cfg: sizes, dropout, activation, norm kind and placement, attention and feed-forward variants.
        cross_attention: add attention to an encoder's output (a decoder layer of the encoder-decoder).
    """

    def __init__(self, cfg: ModelConfig, cross_attention: bool) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = attention_layer(cfg)
        self.self_attn_norm = norm_layer(cfg)
        self.cross_attn: Optional[MultiHeadAttention] = None
        self.cross_attn_norm: Optional[nn.Module] = None
        if cross_attention:
            self.cross_attn = attention_layer(cfg, cross=True)
            self.cross_attn_norm = norm_layer(cfg)
        gated = cfg.feed_forward == "gated"
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.feed_forward_dropout, cfg.activation, gated, cfg.ffn_bias)
        self.ff_norm = norm_layer(cfg)
        self.dropout = Dropout(cfg.dropout)

    def _residual(self, x: Tensor, norm: nn.Module, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        return residual_connection(x, norm, lambda h, r: r + self.dropout(sublayer(h)), self.norm_first)

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        is_causal: bool = False,
        memory: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        cache: Optional[tuple[KVCache, KVCache]] = None,
        attn_maps: Optional[list] = None,
        rotary: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        """x: (B, T, E). mask/is_causal: self-attention mask. memory: (B, S, E) encoder output, with
        memory_mask (B, 1, 1, S). cache: (self, cross) KV caches when decoding step by step. attn_maps: a list
        to append this layer's attention weights to ({"self": (B, H, T, T), "cross": (B, H, T, S)}). rotary:
        (cos, sin) of x's positions, for rotary positions."""
        need = attn_maps is not None
        record = {}
        self_cache, cross_cache = cache if cache is not None else (None, None)

        def self_attention(h: Tensor) -> Tensor:
            out, record["self"] = self.self_attn(
                h, mask=mask, is_causal=is_causal, cache=self_cache, need_weights=need, rotary=rotary
            )
            return out

        x = self._residual(x, self.self_attn_norm, self_attention)
        if self.cross_attn is not None:

            def cross_attention(h: Tensor) -> Tensor:
                out, record["cross"] = self.cross_attn(h, memory, memory_mask, cache=cross_cache, need_weights=need)
                return out

            x = self._residual(x, self.cross_attn_norm, cross_attention)
        x = self._residual(x, self.ff_norm, self.ff)
        if need:
            attn_maps.append(record)
        return x
