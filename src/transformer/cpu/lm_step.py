"""A decoder-only model's stack, one new token per row at a time, written lean for sampling and greedy decoding.

The prompt is read by the modules in one pass (`TransformerLM.forward` with a `DecoderCache`); each later step
feeds one token per row through `LMStepDecoder.step`, which computes what `Decoder.forward` computes for it
(up to the order of float operations; tests compare the two) from the same layers, read once:

- each projection's weight in the form its product takes (`step.make_product`: BLAS, oneDNN's packed layout,
  bf16, int8), prepared once per `packed_weights()` block;
- 1/sqrt(head dim) folded into the query projection (where no QK-norm comes between);
- grouped-query attention as one batched product per step: the H query heads of a row are viewed as
  (H_kv, H / H_kv) groups that meet their key/value head's cache directly, with no copy of keys or values per
  query head; left padding and a sliding window become one additive bias per step, shared by every layer;
- the rotation of the new position computed once per step for every layer.

It keeps its keys and values in the model's own `DecoderCache`, so a step and a module call can follow each
other (a context window re-read, a chat's next turn). Norms, activations, the gate and the norm placement come
from the layer definitions (`layers.ACTIVATIONS`, `layers.residual_connection`, each norm module).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..layers import ACTIVATIONS, residual_connection
from ..rope import apply_rotary
from .step import bound_norm, make_product, output_hooks, prepared_once, scaled_rows

# the rows each product's kind is timed at: a language model often decodes one sequence (a chat, a prompt)
ROWS = 1


class _LMLayer:
    """One decoder layer's products, norms and attention shape, as a step needs them."""

    def __init__(self, layer: nn.Module, activation: str) -> None:
        attn = layer.self_attn
        self.heads, self.kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.scale = 1.0 / math.sqrt(self.head_dim)
        if attn.q_norm is None:  # fold the scale into the query rows; QK-norm would undo it, so scale after it
            self.qkv = make_product(attn.qkv_proj, *scaled_rows(attn.qkv_proj, attn.split[0], self.scale), rows=ROWS)
            self.scale = 1.0
        else:
            self.qkv = make_product(attn.qkv_proj, rows=ROWS)
        self.out = make_product(attn.out_proj, rows=ROWS)
        self.gated = layer.ff.gated
        self.act = ACTIVATIONS[activation]
        self.ff1 = make_product(layer.ff.linear1, activation=None if self.gated else activation, rows=ROWS)
        self.ff2 = make_product(layer.ff.linear2, rows=ROWS)
        self.split = attn.split
        self.norm_first = layer.norm_first
        self.attn_norm, self.ff_norm = bound_norm(layer.self_attn_norm), bound_norm(layer.ff_norm)


class LMStepDecoder:
    """A `TransformerLM`'s decoder and output layer, prepared for decoding one token per row per step.

    `step(tokens, cache)` takes (n,) newest tokens and the model's `DecoderCache` (holding the prompt and every
    earlier step) and gives (n, V) next-token logits, the tokens' keys and values added to the cache."""

    def __init__(self, model: nn.Module) -> None:
        cfg, dec = model.config, model.decoder
        self.embedding, self.embed_scale = dec.embed.embedding.weight.detach(), dec.embed.scale
        self.positions, self.rotary, self.window = dec.positions, dec.rotary, dec.window
        self.layers = [_LMLayer(layer, cfg.activation) for layer in dec.layers]
        self.final_norm = None if dec.norm is None else bound_norm(dec.norm)
        self.output = make_product(model.output, rows=ROWS)
        self.output_module = model.output

    def step(self, tokens: Tensor, cache) -> Tensor:
        n, L = tokens.numel(), cache.length + 1  # rows; keys after this step
        real = None if cache.real is None else torch.cat([cache.real, cache.real.new_ones(n, 1)], dim=1)
        position = (real.sum(1) - 1) if real is not None else torch.full((n,), cache.length, device=tokens.device)
        x = torch.embedding(self.embedding, tokens)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        rotary = None
        if self.rotary is not None:
            rotary = self.rotary(position[:, None])  # (n, 1, 1, R): one rotation per row, for every layer
        else:
            x = self.positions(x[:, None], positions=position[:, None])[:, 0]
        bias = _bias(real, L, self.window, x.dtype, tokens.device)
        for layer, (kv, _) in zip(self.layers, cache.layers):

            def attention(h: Tensor, residual: Tensor) -> Tensor:
                return layer.out(_attend(layer, h, kv, rotary, bias), residual=residual)

            def feed_forward(h: Tensor, residual: Tensor) -> Tensor:
                h = layer.ff1(h)
                if layer.gated:
                    gate, value = h.chunk(2, dim=-1)
                    h = layer.act(gate) * value
                return layer.ff2(h, residual=residual)

            x = residual_connection(x, layer.attn_norm, attention, layer.norm_first)
            x = residual_connection(x, layer.ff_norm, feed_forward, layer.norm_first)
        if self.final_norm is not None:
            x = self.final_norm(x)
        cache.length, cache.real = L, real
        return output_hooks(self.output_module, x, self.output(x))


def _attend(layer: _LMLayer, h: Tensor, kv, rotary: Optional[tuple[Tensor, Tensor]], bias: Optional[Tensor]) -> Tensor:
    """(n, E) normed inputs -> (n, H * D) attention of each row's new query over its cache, the new key and
    value appended to it (`kv`, the layer's KVCache)."""
    n, H, H_kv, D = h.size(0), layer.heads, layer.kv_heads, layer.head_dim
    q, k, v = layer.qkv(h).split(layer.split, dim=-1)
    q, k, v = q.view(n, H, 1, D), k.view(n, H_kv, 1, D), v.view(n, H_kv, 1, D)
    if layer.q_norm is not None:
        q, k = layer.q_norm(q) * layer.scale, layer.k_norm(k)
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    keys, values = kv.append(k, v)  # (n, H_kv, L, D)
    grouped = q.view(n, H_kv, H // H_kv, D)  # the query heads that share each key/value head, side by side
    scores = torch.matmul(grouped, keys.transpose(-1, -2))  # (n, H_kv, G, L)
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(weights, values).reshape(n, H * D)


def _bias(real: Optional[Tensor], L: int, window: int, dtype: torch.dtype, device) -> Optional[Tensor]:
    """(n, 1, 1, L) additive mask for the new queries: -inf on padding and on keys outside the window."""
    if real is None and (not window or L <= window):
        return None
    allowed = torch.ones(1, L, dtype=torch.bool, device=device) if real is None else real
    if window and L > window:
        allowed = allowed & (torch.arange(L, device=device) > L - 1 - window)
    zeros = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
    return zeros.masked_fill(~allowed, float("-inf"))[:, None, None, :]


def lm_step_decoder(model: nn.Module) -> Optional[LMStepDecoder]:
    """The `LMStepDecoder` of a decoder-only `model` for decoding now, or None where the module path decodes
    (a GPU, training mode, weights in another dtype, hooks on the decoder's modules). Inside a
    `packed_weights(model)` or `int8_weights(model)` block it is prepared once and reused."""
    if model.training or getattr(model.config, "arch", None) != "decoder-only":
        return None
    return prepared_once(model, "lm_step", LMStepDecoder)
