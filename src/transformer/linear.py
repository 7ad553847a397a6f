"""`Linear`: `nn.Linear` whose fp32 products on CPU may run through oneDNN instead of the default BLAS.

Every projection in the model is a matrix product, and on CPU they are most of the time of a training step and
of decoding. PyTorch's CPU `F.linear` in fp32 calls MKL's sgemm; the same build also ships oneDNN, which
PyTorch already uses for bf16. Which of the two is faster depends on the CPU (see `backend.py`), for training
products and for the few-row products of decoding against a weight pre-packed into oneDNN's blocked layout, so
each path is taken only where `backend.cpu_paths()` found it faster on this machine. The results are fp32 either way (no reduced-precision arithmetic); only the order of the sums
differs, as it does between any two BLAS libraries.

Paths: fp32 training (an autograd function with all three products in oneDNN), fp32 decoding with packed
weights, and decoding under bf16 autocast with bf16-packed weights (bf16 autocast training already reaches
oneDNN through `F.linear`). Everything else (GPU, float64, tensor subclasses, other CPUs) is plain `F.linear`.
`TRANSFORMER_ONEDNN=0` turns every oneDNN path off.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import backend, int8
from .errors import TransformerError


def _onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x @ weight.T + bias. Any strides: transposed views cost no copy."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _plain_cpu_fp32(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and type(x) is torch.Tensor
        and type(weight) in (torch.Tensor, nn.Parameter)  # not DTensor or other subclasses
        and x.numel() > 0
        and weight.dtype == torch.float32
    )


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
        self._pack_block: Optional[object] = None  # a token for the outermost packed_weights() block around it
        self._step_cache: Optional[tuple] = None  # on a model's output layer: its prepared decoding step (incremental.py)
        self._packed: dict[torch.dtype, Tensor] = {}
        self._int8: Optional[object] = None  # inside int8_weights(): the int8 weight, packed for int8.py or fbgemm

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pack_depth"], state["_packed"], state["_int8"] = 0, {}, None  # copies never carry packed weights
        state["_pack_block"], state["_step_cache"] = None, None
        return state

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if not _plain_cpu_fp32(x, w):
            return F.linear(x, w, b)
        if self._int8 is not None and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            if isinstance(self._int8, int8.Int8Weight):
                return int8.linear(x, self._int8)
            return torch.ops.quantized.linear_dynamic(x, self._int8)
        paths = backend.cpu_paths()
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))
        if torch.is_autocast_enabled("cpu"):  # autocast runs the product in its dtype
            bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
            if bf16 and paths.packed_bf16 and self._pack_depth and not grad:
                return self._packed_product(x, torch.bfloat16)
            return F.linear(x, w, b)  # bf16 autocast: F.linear reaches oneDNN already
        if x.dtype != torch.float32:
            return F.linear(x, w, b)
        if grad:
            return _OneDNNLinear.apply(x, w, b) if paths.train else F.linear(x, w, b)
        if paths.packed and self._pack_depth:
            return self._packed_product(x, torch.float32)
        return _onednn(x, w, b) if paths.train else F.linear(x, w, b)

    def _packed_product(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        if dtype not in self._packed:
            self._packed[dtype] = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().to(dtype), 32)
        b = self.bias
        return _onednn(x.to(dtype), self._packed[dtype], None if b is None else b.to(dtype))


@contextlib.contextmanager
def packed_weights(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the `Linear`s in `modules` multiply by weights packed once into oneDNN's blocked layout:
    for decoding loops, where the same weights meet a few rows at every step (where `backend.cpu_paths()` found
    that faster than `F.linear`). The weights must not change inside the block; the
    packed copies are dropped when it ends. Blocks may nest."""
    linears = list({id(m): m for module in modules for m in module.modules() if isinstance(m, Linear)}.values())
    for m in linears:
        m._pack_depth += 1
        if m._pack_depth == 1:
            m._pack_block = object()  # what was prepared from these weights stays valid until the block ends
    try:
        yield
    finally:
        for m in linears:
            m._pack_depth -= 1
            if m._pack_depth == 0:
                m._packed, m._pack_block = {}, None
                if m._int8 is None:  # a step prepared inside int8_weights() lives as long as that block
                    m._step_cache = None


@contextlib.contextmanager
def int8_weights(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the `Linear`s in `modules` multiply (without gradients, on CPU, in fp32) by int8
    weights: each output row's weights scaled to [-127, 127] (per-channel), the input quantised on the fly
    (dynamic quantisation: this package's int8 kernel where `int8.available()`, else fbgemm; for every product
    alike, by that rule and never by a timing, since the two quantise inputs differently). Decoding reads
    every weight at every step, so a quarter of the bytes makes it faster; results differ from fp32 by the
    rounding of weights and inputs to 8 bits. Not nestable."""
    vnni = int8.available()
    if not vnni and not backend.int8_works():
        raise TransformerError("int8 decoding needs PyTorch's quantized CPU kernels (fbgemm) or a CPU with "
                               "AVX-512 VNNI and a C compiler, which this machine lacks; decode in fp32 or bf16")
    linears = list({id(m): m for module in modules for m in module.modules() if isinstance(m, Linear)}.values())
    try:
        for m in linears:
            w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
            m._int8 = int8.pack(w, b) if vnni else int8.pack_fbgemm(w, b)
        yield
    finally:
        for m in linears:
            m._int8, m._step_cache = None, None

