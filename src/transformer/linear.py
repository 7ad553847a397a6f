"""`Linear`: `nn.Linear` whose fp32 products on CPU run through oneDNN instead of the default BLAS.

Every projection in the model is a matrix product, and on CPU they are most of the time of a training step and
of decoding. PyTorch's CPU `F.linear` in fp32 calls MKL's sgemm; the same build also ships oneDNN, which
PyTorch already uses for bf16. Measured on this project's 2-core AMD EPYC (torch 2.13): oneDNN runs the fp32
products of a training step (1024 x 512 by 512 x 2048 and their two backward products) at 300-480 GFLOP/s
against MKL's ~210, and the 32-row products of decoding 2x faster again once the weight is pre-packed into
oneDNN's blocked layout. The results are fp32 in both (no reduced-precision arithmetic); only the order of the
sums differs, as it does between any two BLAS libraries.

Used where it applies: fp32 tensors on CPU outside autocast, and decoding under bf16 autocast (packed bf16
weights; bf16 autocast training already reaches oneDNN through `F.linear`). Everything else (GPU, float64,
tensor subclasses) is plain `F.linear`, and so is everything on CPUs other than x86-64. Set the environment
variable TRANSFORMER_ONEDNN=0 (or `transformer.linear.ONEDNN = False`) to turn it off.
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def _probe() -> bool:
    """oneDNN's linear is a private PyTorch op: use it only if this build has it and it agrees with F.linear."""
    try:
        # fixed values, not torch.randn: importing the package must not move the global random state
        x, w, b = torch.arange(24.0).view(3, 8).sin(), torch.arange(40.0).view(5, 8).cos(), torch.arange(5.0)
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        out2 = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        ref = F.linear(x, w, b)
        return bool(torch.allclose(out, ref, atol=1e-5) and torch.allclose(out2, ref, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# x86-64 only: that is where oneDNN has its own JIT kernels (AVX2 / AVX-512) and was measured faster; elsewhere
# (e.g. ARM laptops) the platform's BLAS behind F.linear is left in charge. TRANSFORMER_ONEDNN=0 turns it off.
ONEDNN: bool = (
    os.environ.get("TRANSFORMER_ONEDNN", "1") != "0"
    and platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and _probe()
)


def _onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x @ weight.T + bias. Any strides: transposed views cost no copy."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_dtype(x: Tensor, weight: Tensor) -> Optional[torch.dtype]:
    """The dtype to compute x @ weight.T in with oneDNN here, or None for plain `F.linear`."""
    if not (
        ONEDNN
        and x.device.type == "cpu"
        and type(x) is torch.Tensor
        and type(weight) in (torch.Tensor, nn.Parameter)  # not DTensor or other subclasses
        and x.numel() > 0
        and weight.dtype == torch.float32
    ):
        return None
    if torch.is_autocast_enabled("cpu"):  # autocast would run the product in its dtype
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
        return torch.bfloat16 if bf16 else None
    return torch.float32 if x.dtype == torch.float32 else None


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with all three products (forward, input gradient, weight gradient) in oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @once_differentiable  # oneDNN's op has no derivative of its own: refuse double backward rather than be wrong
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t(), None)  # (.., N) @ (N, K)
        g2 = grad.reshape(-1, grad.size(-1))  # (M, N)
        if ctx.needs_input_grad[1]:
            grad_w = _onednn(g2.t(), x.reshape(-1, x.size(-1)).t(), None)  # (N, M) @ (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same results up to summation order) with fp32 CPU products in oneDNN.

    Inside `packed_weights(model)` (the decoding loops use it) and without gradients, the weight is packed once
    into oneDNN's layout, in bf16 under bf16 autocast."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self._pack_depth = 0  # > 0 inside packed_weights()
        self._packed: dict[torch.dtype, Tensor] = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pack_depth"], state["_packed"] = 0, {}  # copies and pickles never carry packed weights
        return state

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        dtype = _onednn_dtype(x, w)
        if dtype is None:
            return F.linear(x, w, b)
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))
        if self._pack_depth and not grad:
            if dtype not in self._packed:
                self._packed[dtype] = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype), 32)
            return _onednn(x.to(dtype), self._packed[dtype], None if b is None else b.to(dtype))
        if dtype != torch.float32:
            return F.linear(x, w, b)  # bf16 autocast: F.linear reaches oneDNN already
        if grad:
            return _OneDNNLinear.apply(x, w, b)
        return _onednn(x, w, b)


@contextlib.contextmanager
def packed_weights(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the `Linear`s in `modules` multiply by weights packed once into oneDNN's blocked layout:
    for decoding loops, where the same weights meet a few rows at every step (32-row products measured 1.3x
    faster than unpacked oneDNN, 2.4x faster than `F.linear`). The weights must not change inside the block; the
    packed copies are dropped when it ends. Blocks may nest."""
    linears = list({id(m): m for module in modules for m in module.modules() if isinstance(m, Linear)}.values())
    for m in linears:
        m._pack_depth += 1
    try:
        yield
    finally:
        for m in linears:
            m._pack_depth -= 1
            if m._pack_depth == 0:
                m._packed = {}
