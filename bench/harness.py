"""Interleaved timing: every round runs each contender once (in a rotating order), after a warm-up, so drift
of a shared machine hits all contenders alike. Reports medians, the median of per-round ratios and their
spread, and checks that every contender did the same work in every round."""

from __future__ import annotations

import statistics
import time
from typing import Callable


class UnequalWork(RuntimeError):
    """Contenders of one workload did different amounts of work (e.g. decoded different numbers of tokens)."""


def compare(contenders: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 2,
            same_work: bool = True) -> dict[str, dict]:
    """Time each contender `rounds` times, interleaved. A contender returns the work it did (tokens); with
    `same_work`, every contender must return the same work in every round, or UnequalWork is raised."""
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    work: dict[str, list[object]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t = time.perf_counter()
            work[n].append(contenders[n]())
            times[n].append(time.perf_counter() - t)
        if same_work and len({work[n][-1] for n in names}) > 1:
            raise UnequalWork(f"round {r}: the contenders did different work: "
                              + ", ".join(f"{n}={work[n][-1]}" for n in names))
    return {n: {"median_s": statistics.median(ts), "times_s": ts, "work": work[n]} for n, ts in times.items()}


def ratio(result: dict[str, dict], ours: str, peer: str) -> tuple[float, float]:
    """(median, interquartile range) over rounds of peer_time / our_time (> 1: we are faster)."""
    r = sorted(p / o for p, o in zip(result[peer]["times_s"], result[ours]["times_s"]))
    if len(r) < 4:
        return statistics.median(r), r[-1] - r[0]
    q = statistics.quantiles(r, n=4)
    return statistics.median(r), q[2] - q[0]
