"""Rotary position embeddings (RoPE, Su et al. 2021), the positions of today's decoder-only models.

Instead of adding a position vector to the input, each query and key is rotated by an angle proportional to its
position: pairs of dimensions (i, i + d/2) of a head turn by position * inv_freq[i]. The dot product of a
query at position m with a key at position n then depends only on m - n, so attention sees relative positions,
and nothing is learned or stored per position.

The pairing is the "halves" layout (dimension i with i + d/2) that Llama, Qwen, Mistral and Gemma checkpoints
use. With `fraction` < 1 only the first fraction of each head's dimensions rotate (partial rotary); the rest
pass through. The frequency scalings the families use to stretch a model past the context it was trained on:

- "linear": positions divided by `factor` (every frequency / factor);
- "dynamic" (NTK-aware): once a sequence is longer than the original context, the base theta grows with the
  length, so low frequencies stretch and high ones barely move; computed from the longest position in the call;
- "llama3": Llama 3.1's: wavelengths longer than original_context / low_freq_factor are divided by `factor`,
  those shorter than original_context / high_freq_factor are kept, and the band between is interpolated.

Angles are computed in float32 in the order Hugging Face `transformers` computes them, so imported models give
the same logits far into a long context (a float64 table would differ from theirs by ~1e-4 rad at position 4096).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig


def inverse_frequencies(cfg: ModelConfig, theta: float | Tensor | None = None) -> Tensor:
    """(rotary_dim / 2,) float32 frequencies of a head's rotating pairs for base `theta` (default rope_theta),
    before any length-dependent scaling."""
    dim = cfg.rotary_dim
    theta = cfg.rope_theta if theta is None else theta
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        return _llama3(inv, cfg)
    return inv


def _llama3(inv: Tensor, cfg: ModelConfig) -> Tensor:
    """Llama 3.1's scaling: long wavelengths slowed by `factor`, short ones kept, the band between blended."""
    old = cfg.rope_original_max_positions
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    slowed = torch.where(wavelen > old / low, inv / cfg.rope_factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * slowed / cfg.rope_factor + smooth * slowed
    between = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(between, blended, slowed)


class RotaryEmbedding(nn.Module):
    """The cosines and sines of each position's rotation, shared by every layer of a stack.

    `forward(positions)`: (B, T) integer positions -> (cos, sin), each (B, 1, T, rotary_dim), float32, for
    `apply_rotary`. Under "dynamic" scaling the frequencies depend on the longest position asked for."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", inverse_frequencies(cfg), persistent=False)

    def _frequencies(self, positions: Tensor) -> Tensor:
        cfg = self.cfg
        if cfg.rope_scaling != "dynamic":
            return self.inv_freq
        length = int(positions.max()) + 1
        old = cfg.rope_original_max_positions
        if length <= old:
            return self.inv_freq
        dim, factor = cfg.rotary_dim, cfg.rope_factor
        # float32 tensor arithmetic, as transformers computes the grown base (a float64 base differs in the last bits)
        grown = torch.tensor(length) * factor / old - (factor - 1)
        return inverse_frequencies(cfg, cfg.rope_theta * grown ** (dim / (dim - 2))).to(positions.device)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        inv = self._frequencies(positions)
        angles = positions.float()[:, :, None] * inv.float()[None, None, :]  # (B, T, rotary_dim / 2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, rotary_dim): both halves of each pair
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) queries or keys by their positions' angles (cos, sin: (B, 1, T, R), R <= D): each
    pair (x_i, x_{i + R/2}) of the first R dimensions becomes (x_i cos - x_{i+R/2} sin, x_{i+R/2} cos + x_i sin).
    The result keeps x's dtype."""
    R = cos.size(-1)
    rot, rest = (x, None) if R == x.size(-1) else (x[..., :R], x[..., R:])
    first, second = rot.chunk(2, dim=-1)
    turned = torch.cat([-second, first], dim=-1)  # the partner of each dimension, with the sign of the rotation
    out = rot * cos.to(x.dtype) + turned * sin.to(x.dtype)
    return out if rest is None else torch.cat([out, rest], dim=-1)
