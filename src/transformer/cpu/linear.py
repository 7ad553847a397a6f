"""`Linear`: `nn.Linear` whose fp32 products on CPU may run through oneDNN instead of the default BLAS.

Every projection in the model is a matrix product, and on CPU they are most of the time of a training step and
of decoding. PyTorch's CPU `F.linear` in fp32 calls MKL's sgemm; the same build also ships oneDNN, which
PyTorch already uses for bf16. Which of the two is faster depends on the CPU, for training products and for the
few-row products of decoding against a weight pre-packed into oneDNN's blocked layout, so each path is taken
only where `paths.cpu_paths()` found it faster on this machine. The results are fp32 either way (no
reduced-precision arithmetic); only the order of the sums differs, as it does between any two BLAS libraries.

Paths: fp32 training (an autograd function with all three products in oneDNN), fp32 decoding with packed
weights, and decoding under bf16 autocast with bf16-packed weights (bf16 autocast training already reaches
oneDNN through `F.linear`), and int8 decoding inside `int8_weights()`. Everything else (GPU, float64, tensor
subclasses, other CPUs) is plain `F.linear`. `TRANSFORMER_ONEDNN=0` turns every oneDNN path off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..errors import TransformerError
from . import int8
from .paths import cpu_paths, onednn_linear, pack


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
        return onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable  # oneDNN's op has no derivative of its own: refuse double backward rather than be wrong
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(grad, weight.t(), None)  # (.., N) @ (N, K)
        g2 = grad.reshape(-1, grad.size(-1))  # (M, N)
        if ctx.needs_input_grad[1]:
            grad_w = onednn_linear(g2.t(), x.reshape(-1, x.size(-1)).t(), None)  # (N, M) @ (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


@dataclass(eq=False)
class PreparedWeights:
    """What a `Linear` keeps from its weight inside `packed_weights()` and `int8_weights()` blocks, where the
    weight must not change: dropped when the outermost block ends. Its identity stands for "these weights, as
    they are now": code that derives something from the weights (the decoding step) keeps it in `derived`."""

    depth: int = 0  # packed_weights() blocks open around the layer
    packed: dict[torch.dtype, Tensor] = field(default_factory=dict)  # the weight in oneDNN's layout, per dtype
    int8: Optional[object] = None  # inside int8_weights(): int8.Int8Weight (the kernel's) or fbgemm's packing
    derived: dict[str, object] = field(default_factory=dict)  # built from these weights by other code


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same results up to summation order) with fp32 CPU products in oneDNN.

    Inside `packed_weights(model)` (the decoding loops use it) and without gradients, the weight is packed once
    into oneDNN's layout, in bf16 under bf16 autocast; inside `int8_weights(model)`, it multiplies in int8."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.prepared: Optional[PreparedWeights] = None  # inside packed_weights()/int8_weights() only

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["prepared"] = None  # copies never carry packed weights
        return state

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if not _plain_cpu_fp32(x, w):
            return F.linear(x, w, b)
        p = self.prepared
        if (
            p is not None
            and p.int8 is not None
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
        ):
            if isinstance(p.int8, int8.Int8Weight):
                return int8.linear(x, p.int8)
            return torch.ops.quantized.linear_dynamic(x, p.int8)
        paths = cpu_paths()
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))
        packing = p is not None and p.depth > 0 and not grad
        if torch.is_autocast_enabled("cpu"):  # autocast runs the product in its dtype
            bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
            if bf16 and paths.packed_bf16 and packing:
                return self._packed_product(p, x, torch.bfloat16)
            return F.linear(x, w, b)  # bf16 autocast: F.linear reaches oneDNN already
        if x.dtype != torch.float32:
            return F.linear(x, w, b)
        if grad:
            return _OneDNNLinear.apply(x, w, b) if paths.train else F.linear(x, w, b)
        if paths.packed and packing:
            return self._packed_product(p, x, torch.float32)
        return onednn_linear(x, w, b) if paths.train else F.linear(x, w, b)

    def _packed_product(self, p: PreparedWeights, x: Tensor, dtype: torch.dtype) -> Tensor:
        if dtype not in p.packed:
            p.packed[dtype] = pack(self.weight.detach().to(dtype), 32)
        b = self.bias
        return onednn_linear(x.to(dtype), p.packed[dtype], None if b is None else b.to(dtype))


def _linears(modules: tuple[nn.Module, ...]) -> list[Linear]:
    return list({id(m): m for module in modules for m in module.modules() if isinstance(m, Linear)}.values())


@contextlib.contextmanager
def packed_weights(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the `Linear`s in `modules` multiply by weights packed once into oneDNN's blocked layout:
    for decoding loops, where the same weights meet a few rows at every step (where `cpu_paths()` found that
    faster than `F.linear`). The weights must not change inside the block; what was prepared from them is
    dropped when the outermost block ends. Blocks may nest."""
    linears = _linears(modules)
    for m in linears:
        if m.prepared is None:
            m.prepared = PreparedWeights()
        m.prepared.depth += 1
    try:
        yield
    finally:
        for m in linears:
            p = m.prepared
            p.depth -= 1
            if p.depth == 0:
                p.packed = {}
                if p.int8 is None:  # a step prepared inside int8_weights() lives as long as that block
                    m.prepared = None


@contextlib.contextmanager
def int8_weights(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the `Linear`s in `modules` multiply (without gradients, on CPU, in fp32) by int8
    weights: each output row's weights scaled to [-127, 127] (per-channel), the input quantised on the fly
    (dynamic quantisation, by `int8.kind()`: this package's kernel where it runs, else fbgemm; for every product
    alike, by that rule and never by a timing, since the two quantise inputs differently). Decoding reads
    every weight at every step, so a quarter of the bytes makes it faster; results differ from fp32 by the
    rounding of weights and inputs to 8 bits. Not nestable."""
    kind = int8.kind()
    if kind is None:
        raise TransformerError(
            "int8 decoding needs PyTorch's quantized CPU kernels (fbgemm) or a CPU with "
            "AVX-512 VNNI and a C compiler, which this machine lacks; decode in fp32 or bf16"
        )
    linears = _linears(modules)
    try:
        for m in linears:
            w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
            if m.prepared is None:
                m.prepared = PreparedWeights()
            m.prepared.int8 = int8.pack(w, b) if kind == "vnni" else int8.pack_fbgemm(w, b)
            m.prepared.derived = {}  # what was derived from the fp32 weights decodes otherwise now
        yield
    finally:
        for m in linears:
            p = m.prepared
            if p is None:
                continue
            p.int8, p.derived = None, {}
            if p.depth == 0:
                m.prepared = None
