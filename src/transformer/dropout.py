"""Dropout with a cheaper random mask: used on attention weights, residuals, embeddings and in the feed-forward."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout (zero with probability p, scale the rest by 1 / (1 - p)); pass p=0 when not training.

    Same as `F.dropout`, but with a cheaper random mask: 16 random bits per element, drawn 64 at a time with
    `random_` over the whole int64 range, instead of `F.dropout`'s `bernoulli_`, which draws and compares a
    float per element: on a CPU dropout is a large share of a bf16 training step, and this mask costs several
    times less. p is resolved to 1/65536.
    """
    if p == 0.0:
        return x
    n = x.numel()
    # full-range int64 draws cost less per random bit than narrower ones on a CPU
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)  # all 64 bits
    bits = bits.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    keep = bits >= int(p * 65536) - 32768
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """`nn.Dropout` with the cheaper mask of `dropout`: active in training mode only."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"
