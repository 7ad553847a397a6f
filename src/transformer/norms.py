"""The normalisation layers: LayerNorm (the paper's) and RMSNorm (Llama's, and Gemma's 1 + weight form).

RMSNorm drops LayerNorm's centring and bias: x / sqrt(mean(x^2) + eps) * weight. It is computed in float32
whatever the input's dtype, then cast back, as the families that use it compute it (Llama multiplies by the
weight after the cast; Gemma before, with 1 + weight, its weights stored as offsets from one).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension. `unit_offset`: scale by 1 + weight (Gemma's),
    with the weight initialised to 0 instead of 1. Shapes: (..., dim) -> the same."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, unit_offset={self.unit_offset}"


def norm_layer(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The normalisation `cfg.norm` names, over `dim` features (default d_model), with `cfg.layer_norm_eps`."""
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
    return RMSNorm(dim, cfg.layer_norm_eps, unit_offset=cfg.norm == "gemma_rmsnorm")
