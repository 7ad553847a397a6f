"""The training loss: cross entropy with label smoothing, computed a block of rows at a time.

With smoothing eps over V classes the target distribution puts 1 - eps on the right token and eps / V on
every token, so for one row of logits z with log-sum-exp L:

    loss = (1 - eps) * (L - z[target]) + eps * (L - mean(z))
    d loss / d z = softmax(z) - eps / V - (1 - eps) * onehot(target)

This is what `F.cross_entropy(z.float(), target, label_smoothing=eps)` computes. Doing it by hand avoids what
that costs on a (tokens x vocabulary) matrix, a large share of the non-matmul time of a bf16 training step:
a float32 copy of the logits, the saved log-probabilities, a zero-filled gradient and a separate
smoothing term, each a full pass over memory. Here the forward keeps one number per row (L) and the backward
writes the gradient straight into one output, both working on blocks of rows small enough to stay in cache.
On GPUs `F.cross_entropy` is used as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

_BLOCK = 2**18  # elements of float32 work per block of rows (1 MiB)


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays


class _SmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, eps: float) -> Tensor:
        N, V = logits.shape
        rows = max(1, _BLOCK // V)
        dtype = _compute_dtype(logits)
        lse = torch.empty(N, dtype=dtype, device=logits.device)
        mean = torch.empty(N, dtype=dtype, device=logits.device)
        for s in range(0, N, rows):
            z = logits[s : s + rows].to(dtype)
            torch.logsumexp(z, dim=1, out=lse[s : s + rows])
            torch.mean(z, dim=1, out=mean[s : s + rows])
        picked = logits.gather(1, target[:, None]).squeeze(1).to(dtype)
        ctx.save_for_backward(logits, target, lse)
        ctx.eps = eps
        return (lse - (1.0 - eps) * picked - eps * mean).mean()

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: refuse double backward rather than be wrong
    def backward(ctx, grad: Tensor):
        logits, target, lse = ctx.saved_tensors
        N, V = logits.shape
        eps, rows = ctx.eps, max(1, _BLOCK // V)
        dtype = _compute_dtype(logits)
        scale = grad.to(dtype) / N
        out = torch.empty_like(logits)
        in_place = logits.dtype == dtype
        for s in range(0, N, rows):
            e = min(s + rows, N)
            g = out[s:e].copy_(logits[s:e]) if in_place else logits[s:e].to(dtype)
            g.sub_(lse[s:e, None]).exp_().sub_(eps / V)  # softmax - eps / V
            g.scatter_add_(1, target[s:e, None], g.new_full((e - s, 1), eps - 1.0))
            g.mul_(scale)
            if not in_place:
                out[s:e] = g
        return out, None, None


def label_smoothed_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross entropy over rows, computed in float32 for bf16/fp16/fp32 logits (float64 stays float64);
    (N, V) logits, (N,) target ids, all valid (padding already removed: there is no ignore_index). Equal to
    `F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)`, gradient included."""
    if logits.size(0) == 0:
        return logits.float().sum() * 0.0
    if logits.device.type != "cpu":  # GPUs have a fused kernel; a Python loop over blocks would only add launches
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    return _SmoothedCrossEntropy.apply(logits, target, float(label_smoothing))
