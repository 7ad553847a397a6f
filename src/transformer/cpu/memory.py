"""Memory settings for CPU processes: glibc's allocator (decoding) and oneDNN's primitive cache (bf16 training)."""

from __future__ import annotations

import logging
import os
import platform
from typing import Optional

from . import machine

log = logging.getLogger("transformer")

# oneDNN keeps every primitive it builds (a kernel compiled for one operation at one shape) in a process-wide
# cache, 1024 of them by default.
ONEDNN_CACHE_CAPACITY = 16


def bound_onednn_cache() -> None:
    """Cap oneDNN's primitive cache at `ONEDNN_CACHE_CAPACITY` for bf16 training on a CPU (the Trainer calls it).

    bf16 training products go through oneDNN, and token bucketing gives nearly every batch a shape of its own,
    so the default cache fills with primitives that are seldom reused and the run's memory grows far past
    fp32's; capped, the same run trains the same bits in fp32's footprint (docs/results has the measurement).
    Not for every process: a small fp32 model's few shapes are reused, and rebuilding them makes its training
    slower. oneDNN reads the capacity when it first builds a primitive, so this takes effect only in a process
    that has not used oneDNN yet; a capacity the user set is kept."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))


# What tune_allocator() asks of glibc: (mallopt parameter from malloc.h, value). M_MMAP_THRESHOLD (-3): blocks
# up to 32 MB come from the heap, not from fresh mappings; M_TRIM_THRESHOLD (-1): up to 1 GB of freed heap is kept;
# M_TOP_PAD (-2): the heap grows 64 MB at a time.
ALLOCATOR_SETTINGS = ((-3, 32 << 20), (-1, 1 << 30), (-2, 64 << 20))
_allocator_tuned: Optional[bool] = None


def tune_allocator() -> bool:
    """Keep freed memory in this process for reuse instead of handing it back to the OS (glibc on Linux only).

    Decoding allocates tensors of a few MB at every step (logits, their log-probabilities, feed-forward
    activations). glibc serves those from fresh `mmap`s or trims them off its heap when freed, so each step
    faults in and zeroes the same pages again; with `ALLOCATOR_SETTINGS` they are reused instead, for ~70 MB
    more resident memory. The CLI calls this once at start; in your own program call it once, early. Skipped
    when `TRANSFORMER_MALLOC=0`, when any `MALLOC_*` variable is set (your own tuning wins), and off glibc.
    Returns whether the settings were applied (also on later calls)."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if machine.switch("MALLOC") == "0" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    _allocator_tuned = all(mallopt(param, value) == 1 for param, value in ALLOCATOR_SETTINGS)
    log.debug("allocator tuned: %s", _allocator_tuned)
    return _allocator_tuned
