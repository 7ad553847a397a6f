"""What this machine is, read in one place: the CPU's model and flags, and the `TRANSFORMER_*` switches.

Switches (each `0`/`off`/`false` turns its path off; `auto`, the default, decides by trying):
- `TRANSFORMER_ONEDNN`: oneDNN products in `Linear` (`1`: every one that works, untimed);
- `TRANSFORMER_STEP_PRODUCT`: force one kind of product in the decoding step (`mkl`, `onednn`, `int8`, `vnni`);
- `TRANSFORMER_VNNI`: this package's int8 kernel; `TRANSFORMER_AMX`: its AMX path;
- `TRANSFORMER_MALLOC`: `0` leaves glibc's allocator as it is.
(`TRANSFORMER_CACHE`, where per-machine files go, is read by `files.cache_root`.)
"""

from __future__ import annotations

import functools
import os
import platform

import torch

SWITCHES = ("ONEDNN", "STEP_PRODUCT", "VNNI", "AMX", "MALLOC")
_OFF = ("0", "off", "false")
_ON = ("1", "on", "true")


def switch(name: str) -> str:
    """The setting of `TRANSFORMER_<name>`, lower-cased ("auto" when unset or empty)."""
    assert name in SWITCHES, name
    return os.environ.get(f"TRANSFORMER_{name}", "").strip().lower() or "auto"


def switched_off(name: str) -> bool:
    return switch(name) in _OFF


def switched_on(name: str) -> bool:
    return switch(name) in _ON


def _cpuinfo_field(field: str) -> str:
    """The first processor's `field` in /proc/cpuinfo (Linux); "" elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), "")
    except OSError:
        return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    return frozenset(_cpuinfo_field("flags").split())


@functools.cache
def cpu_model() -> str:
    """e.g. "AMD EPYC" (the platform's processor name off Linux)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def machine_key() -> str:
    """What a timed choice depends on: the CPU and its flags, the torch build and its kernels, the thread count."""
    return (
        f"{cpu_model()}; flags {' '.join(sorted(cpu_flags()))}; torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}); {torch.get_num_threads()} threads"
    )
