"""The one timing harness of the per-machine choices (`paths`, `step`): interleaved rounds, best time of each.

Interleaving puts every candidate under the same load; the best of several rounds is the least disturbed one.
A choice made from these timings is recorded once per machine (`decisions`), never made anew per process.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

# More than the L2 caches of all of a machine's cores together, for the usual 2-8
EVICT_BYTES = 16 << 20


def fixed(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed values, not torch.randn: timing must not move the global random state."""
    return (torch.arange(rows * cols, dtype=torch.float32).view(rows, cols) * 0.37).sin().to(dtype)


def evicting() -> Callable[[], None]:
    """A call that pushes recently read data out of the cores' L1/L2 (it stays in L3), as the rest of a decoding
    step does to each weight between two of its products."""
    buffer = torch.zeros(EVICT_BYTES // 4)
    return lambda: buffer.add_(1.0)


def best_times(
    fns: dict[str, Callable[[], object]], rounds: int = 5, before_each: Optional[Callable[[], object]] = None
) -> dict[str, float]:
    """Each candidate's best time in seconds over `rounds` interleaved rounds, after one warm-up call of each
    (first calls allocate and pick kernels). `before_each` runs untimed before every timed call."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if before_each is not None:
                before_each()
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def fastest(
    fns: dict[str, Callable[[], object]], rounds: int = 5, before_each: Optional[Callable[[], object]] = None
) -> str:
    """The name of the fastest candidate (`best_times`)."""
    best = best_times(fns, rounds, before_each)
    return min(best, key=best.get)
