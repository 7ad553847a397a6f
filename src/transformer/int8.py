"""int8 products for decoding on CPUs with AVX-512 VNNI: a small C kernel (`int8_vnni.c`), compiled on first use.

Decoding multiplies a few rows by every weight at every step, so in int8 it is bound by how fast a product of a
few rows is. PyTorch's int8 linear (fbgemm's dynamic quantisation) spends most of such a product on fixed costs;
the kernel here quantises the rows and multiplies them in one pass, 1.3-2x faster than fbgemm at decoding's
shapes on an AVX-512 Xeon (`python -m bench.int8_products`). Weights are quantised as fbgemm's are (each output
row scaled to [-127, 127]); inputs get a scale per row instead of fbgemm's one per tensor.

The kernel is used only where all of these hold, and fbgemm (or fp32) is used otherwise:
- Linux on x86-64, with PyTorch dispatching AVX-512 kernels and the CPU reporting AVX-512 VNNI and BW (so the
  kernel never meets a CPU without its instructions; `ATEN_CPU_CAPABILITY=avx2` turns it off too);
- a C compiler (`$CC`, else `cc`) that builds it; the library is cached under `$TRANSFORMER_CACHE` (default
  `~/.cache/transformer`), keyed by the source, the compiler and the OpenMP runtime;
- the OpenMP runtime PyTorch loaded can be linked, so the kernel shares PyTorch's threads (and its thread count);
- its result on a fixed input equals the exact int8 computation (`reference`);
- `TRANSFORMER_VNNI` is not 0.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("int8_vnni.c")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-fopenmp", "-fPIC"]
_TILE = 64  # output columns per tile of the packed weight (int8_vnni.c's NV * 16)


@dataclass(frozen=True)
class Int8Weight:
    """A weight (out_features, in_features) packed for the kernel, with its bias. Padded sizes: Np = out_features
    rounded up to a multiple of 64, Kp = in_features rounded up to a multiple of 4.

    packed: (Np / 64, Kp / 4, 4, 16, 4) int8: tile, 4 inputs, 16-column vector, column, input.
    comp: (Np,) int32, -128 times each row's sum: undoes the +128 shift of the quantised input.
    scale: (Np,) fp32, each row's scale (its largest magnitude / 127). bias: (Np,) fp32 or None."""

    packed: Tensor
    comp: Tensor
    scale: Tensor
    bias: Optional[Tensor]
    out_features: int
    in_features: int


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) weight -> its int8 values (N, K) and each row's scale (N,), the largest magnitude mapped to 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def pack(weight: Tensor, bias: Optional[Tensor] = None) -> Int8Weight:
    """Quantise and lay out `weight` (N, K) and `bias` (N,) for `linear`."""
    N, K = weight.shape
    q, scale = quantize_weight(weight)
    Np, Kp = -(-N // _TILE) * _TILE, -(-K // 4) * 4
    padded = torch.zeros(Np, Kp, dtype=torch.int8)
    padded[:N, :K] = q
    comp = torch.zeros(Np, dtype=torch.int32)
    comp[:N] = q.to(torch.int32).sum(1) * -128
    scales = torch.zeros(Np)
    scales[:N] = scale
    b = None
    if bias is not None:
        b = torch.zeros(Np)
        b[:N] = bias.detach().float()
    packed = padded.view(Np // _TILE, 4, 16, Kp // 4, 4).permute(0, 3, 1, 2, 4).contiguous()
    return Int8Weight(packed, comp, scales, b, N, K)


def linear(x: Tensor, w: Int8Weight, relu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
    """relu?(x W^T + b) + residual with `w` from `pack`, the rows of x quantised to int8 on the fly.

    Args:
        x: (..., in_features) fp32 on CPU.
        relu: apply ReLU before the residual is added.
        residual: (..., out_features) fp32, or None.
    Returns:
        (..., out_features) fp32.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the int8 VNNI kernel is not available here; check int8.available() first")
    return _call(lib, x, w, relu, residual)


def _call(lib: ctypes.CDLL, x: Tensor, w: Int8Weight, relu: bool = False,
          residual: Optional[Tensor] = None) -> Tensor:
    lead, K, N = x.shape[:-1], w.in_features, w.out_features
    if x.size(-1) != K or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"int8.linear: expected fp32 CPU input (..., {K}), got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.size(0)
    y = torch.empty(M, N)
    if M == 0:
        return y.view(*lead, N)
    r = None
    if residual is not None:
        r = residual.reshape(M, N)
        if r.stride(1) != 1 or r.dtype != torch.float32:
            r = r.float().contiguous()
    status = lib.int8_linear(
        x2.data_ptr(), x2.stride(0), M, K, w.packed.size(1) * 4, w.packed.data_ptr(), w.comp.data_ptr(),
        w.scale.data_ptr(), None if w.bias is None else w.bias.data_ptr(), N, w.comp.numel(),
        y.data_ptr(), N, None if r is None else r.data_ptr(), 0 if r is None else r.stride(0), int(relu))
    if status != 0:
        raise MemoryError("int8.linear: out of memory for the quantised input")
    return y.view(*lead, N)


def reference(x: Tensor, w: Int8Weight, relu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
    """What `linear` computes, in PyTorch operations, with the integer products summed exactly (float64): the
    kernel's result must equal this up to the rounding of its last float operations."""
    K, N = w.in_features, w.out_features
    x2 = x.reshape(-1, K).float()
    amax = x2.abs().amax(1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # fp32, as the kernel computes it
    xq = torch.round(x2 * inv[:, None])
    wq = w.packed.permute(0, 2, 3, 1, 4).reshape(w.comp.numel(), -1)[:N, :K]
    acc = (xq.double() @ wq.double().t()).float()
    y = acc * ((amax / 127.0)[:, None] * w.scale[:N])
    if w.bias is not None:
        y = y + w.bias[:N]
    if relu:
        y = torch.relu(y)
    if residual is not None:
        y = y + residual.reshape(-1, N)
    return y.view(*x.shape[:-1], N)


def available() -> bool:
    """Can this machine run the kernel (see the module's docstring)? Decided once per process."""
    return _library() is not None


def _cpu_supports() -> bool:
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # PyTorch's own check (CPU and OS), or the user's cap
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= set(flags)


def _openmp_runtimes() -> list[str]:
    """The OpenMP runtimes loaded in this process (PyTorch's), from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp5")))


def _cache_dir() -> Path:
    root = os.environ.get("TRANSFORMER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "transformer")
    return Path(root) / "kernels"


def _compile(cc: str, omp: str, target: Path) -> None:
    """Build the library into `target` (a temporary file renamed into place: never a half-written one). Linked
    against PyTorch's own OpenMP runtime by path, so that loading it adds no second one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = os.path.join(tmp, "int8_vnni.o"), os.path.join(tmp, "int8_vnni.so")
        subprocess.run([cc, *_FLAGS, "-c", str(_SOURCE), "-o", obj], check=True, capture_output=True, timeout=120)
        subprocess.run([cc, "-shared", obj, "-o", lib, omp, f"-Wl,-rpath,{os.path.dirname(omp)}"],
                       check=True, capture_output=True, timeout=120)
        os.replace(lib, target)


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get("TRANSFORMER_VNNI", "auto").strip().lower() in ("0", "off", "false") or not _cpu_supports():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    runtimes = _openmp_runtimes()
    if not cc or len(runtimes) != 1:
        log.debug("int8 VNNI kernel: no C compiler (%s) or not one OpenMP runtime loaded (%s)", cc, runtimes)
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([_SOURCE.read_text(), version, " ".join(_FLAGS), runtimes[0]]).encode())
        target = _cache_dir() / f"int8_vnni-{key.hexdigest()[:16]}.so"
        if not target.exists():
            _compile(cc, runtimes[0], target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("int8 VNNI kernel unavailable: %s", e)
        return None
    if _openmp_runtimes() != runtimes:  # it brought its own OpenMP: two thread pools would fight over the cores
        log.debug("int8 VNNI kernel: loading it added an OpenMP runtime; not used")
        return None
    f = lib.int8_linear
    f.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    f.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, i64, ptr, i64, ctypes.c_int]
    return lib if _self_test(lib) else None


def _self_test(lib: ctypes.CDLL) -> bool:
    """Does the built kernel give the exact int8 computation on a fixed input (odd sizes: every tail)?"""
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(7, 37, generator=g), torch.randn(70, 37, generator=g), torch.randn(70, generator=g)
    w = pack(weight, bias)
    out = _call(lib, x, w, relu=True, residual=torch.ones(7, 70))
    ok = bool(torch.allclose(out, reference(x, w, relu=True, residual=torch.ones(7, 70)), rtol=1e-5, atol=1e-5))
    if not ok:
        log.debug("int8 VNNI kernel failed its self-test; not used")
    return ok
