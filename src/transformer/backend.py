"""What this machine can do, decided once per process: the device and the precision.

- **device**: `resolve_device("auto" | "cpu" | "cuda" | "cuda:N")`; auto is the GPU when there is one.
- **precision**: `resolve_precision("auto" | "fp32" | "bf16", device)`; auto is bf16 where the hardware does
  bf16 arithmetic (CUDA GPUs that support it; CPUs with AVX512-BF16 or AMX) and fp32 elsewhere, where bf16 is
  emulated through fp32 and far slower than fp32 itself.

The CPU's fast paths (which library multiplies, int8, the decoding step) are `transformer.cpu`'s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
from dataclasses import dataclass
from typing import Optional

import torch

from .cpu import machine
from .cpu.linear import int8_weights
from .cpu.paths import cpu_paths
from .errors import TransformerError

log = logging.getLogger("transformer")

# ----------------------------------------------------------------------------------------------------------
# Device


def resolve_device(spec: str = "auto") -> torch.device:
    """ "auto" (the GPU when one is visible, else the CPU), "cpu", "cuda" or "cuda:N". A GPU that is asked for
    but missing is a TransformerError saying why."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise TransformerError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise TransformerError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise TransformerError(
            f"--device {spec}: no CUDA GPU is visible (torch {torch.__version__} is {build}); use --device cpu"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise TransformerError(f"--device {spec}: there are {torch.cuda.device_count()} GPU(s), numbered from 0")
    return torch.device("cuda", index)


# ----------------------------------------------------------------------------------------------------------
# Precision


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    return machine.cpu_flags()


@functools.cache
def native_bf16_cpu() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16) and PyTorch runs its AVX-512
    kernels (ATEN_CPU_CAPABILITY can hold it to AVX2). Elsewhere bf16 is emulated with fp32 arithmetic plus
    conversions, many times slower than fp32 itself."""
    try:
        hardware = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch: read the flags ourselves
        hardware = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    kernels = torch.backends.cpu.get_cpu_capability().upper()
    return hardware and kernels.startswith("AVX512")


def cpu_description() -> str:
    """e.g. "x86_64, AVX-512 with native bf16" (what the log and the bench print)."""
    flags = cpu_flags()
    if "avx512f" in flags:
        kind = "AVX-512"
    elif "avx2" in flags:
        kind = "AVX2 (no AVX-512)"
    else:
        kind = platform.processor() or "unknown vector extensions"
    bf16 = "native bf16" if native_bf16_cpu() else "no native bf16"
    return f"{platform.machine()}, {kind}, PyTorch kernels {torch.backends.cpu.get_cpu_capability()}, {bf16}"


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # what autocast computes products in (float32: autocast off)
    reason: str

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def bf16_is_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and native_bf16_cpu()


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """The training/decoding precision for `setting` ("auto", "fp32" or "bf16") on `device`. bf16 means bf16
    autocast (weights and optimizer stay fp32). Asking for bf16 where it is emulated works, with a warning."""
    native = bf16_is_native(device)
    where = "this GPU" if device.type == "cuda" else "this CPU"
    if setting == "fp32":
        return Precision(torch.float32, "fp32 as set")
    if setting == "bf16":
        if not native:
            log.warning(
                "bf16 on %s is emulated (no %s): expect it to be many times slower than fp32; "
                "precision auto or fp32 avoids it",
                where,
                "bf16 support" if device.type == "cuda" else "AVX512-BF16 or AMX",
            )
        return Precision(torch.bfloat16, "bf16 as set")
    if setting != "auto":
        raise TransformerError(f"precision {setting!r}: must be auto, fp32 or bf16")
    if native:
        why = "the GPU supports bf16" if device.type == "cuda" else "the CPU has native bf16 (AVX512-BF16/AMX)"
        return Precision(torch.bfloat16, f"auto: {why}")
    why = "the GPU has no bf16" if device.type == "cuda" else "the CPU has no native bf16, it would be emulated"
    return Precision(torch.float32, f"auto: {why}")


def describe(device: torch.device, precision: Precision, variant: Optional[list[str]] = None) -> str:
    """One line for the log: the device, the precision and why, the CPU's fast paths, a recipe's variant."""
    if device.type == "cuda":
        where = f"device: {device} ({torch.cuda.get_device_name(device)})"
    else:
        where = f"device: cpu ({cpu_description()}, {torch.get_num_threads()} threads); {cpu_paths().describe()}"
    changes = f"; the recipe's fp32 variant: {', '.join(variant)}" if variant else ""
    return f"{where}; precision: {precision.name} ({precision.reason}){changes}"


def autocast(device: torch.device, precision: Precision):
    """The autocast context for `precision` on `device` (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.bf16)


def check_decoding(model: torch.nn.Module, bf16: bool, int8: bool) -> None:
    """Refuse, naming the options, a precision `decoding` cannot give `model`."""
    if int8 and bf16:
        raise TransformerError("choose one of --bf16 and --int8")
    if int8 and next(model.parameters()).device.type != "cpu":
        raise TransformerError("--int8 decodes on the CPU (use --device cpu); on a GPU use --bf16")


def decoding(model: torch.nn.Module, bf16: bool = False, int8: bool = False):
    """The context to decode with `model` in: fp32, bf16 (`decoding_precision`) or int8 weights on the CPU
    (`cpu.int8_weights`). What `--bf16`/`--int8` mean to every command and to the server."""
    check_decoding(model, bf16, int8)
    if int8:
        return int8_weights(model)
    return decoding_precision(model, bf16) if bf16 else contextlib.nullcontext()


def decoding_precision(model: torch.nn.Module, bf16: bool):
    """A context to decode with `model` in bf16 (when `bf16`) on its device. On a GPU the weights themselves
    are cast to bf16, once: at decoding sizes a step is bound by kernel launches, and autocast's per-op casts
    made bf16 decoding slower than fp32 (docs/decoding.md). On a CPU it is bf16 autocast, where
    `Linear` packs bf16 weights once per decoding call. The model is changed in place on a GPU: for a model
    loaded to decode, as the command line does."""
    device = next(model.parameters()).device
    precision = resolve_precision("bf16" if bf16 else "fp32", device)
    if precision.bf16 and device.type == "cuda":
        model.to(torch.bfloat16)
        return contextlib.nullcontext()
    return autocast(device, precision)
