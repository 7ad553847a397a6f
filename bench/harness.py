"""Interleaved timing: every round runs each contender once (in a rotating order), after a warm-up, so drift
of a shared machine hits all contenders alike. Reports medians and the median of per-round ratios."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def compare(contenders: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 2) -> dict[str, dict]:
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t = time.perf_counter()
            contenders[n]()
            times[n].append(time.perf_counter() - t)
    return {n: {"median_s": statistics.median(ts), "times_s": ts} for n, ts in times.items()}


def ratio(result: dict[str, dict], ours: str, peer: str) -> float:
    """Median over rounds of peer_time / our_time (> 1: we are faster)."""
    return statistics.median(p / o for p, o in zip(result[peer]["times_s"], result[ours]["times_s"]))
