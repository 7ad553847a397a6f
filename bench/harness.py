"""Interleaved timing: every round runs each contender once (in a rotating order), after a warm-up, so drift
of a shared machine hits all contenders alike. Reports medians, the median of per-round ratios and their
spread, and checks that every contender did the same work in every round.

Contenders in other processes (CTranslate2's worker) must not overlap: after each call OpenMP's threads keep
spin-waiting for the next parallel region (libgomp, which both torch and CTranslate2's wheel bring: 300,000
spins when OMP_WAIT_POLICY and GOMP_SPINCOUNT are unset, measured at 7-12 ms of one core after each call on
an EPYC; Intel's runtime spins KMP_BLOCKTIME, 200 ms by default). A spinning team in one process takes a core
from the contender timed next in another, so `Quiet` waits, after every call, until every thread of the race is
idle again, and records how long that took. Other processes on the machine are not ours to stop: the cores
they used during each contender's timed calls are recorded (`others_cores`), and `unreliable` flags a row
where that, or a contender's figure run alone against its interleaved one, or the spread of the ratio, says the
figure does not hold.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Callable, Iterable, Optional

# The tolerances of `unreliable`, stated once: a row whose figures exceed them prints no ratio.
AGREE = 1.25  # a contender's alone median and interleaved median must agree within this factor
SPREAD = 0.30  # the per-round ratio's interquartile range must stay below this fraction of its median
BUSY = 0.25  # other processes may take at most this many cores, on average, during a contender's timed calls


class UnequalWork(RuntimeError):
    """Contenders of one workload did different amounts of work (e.g. decoded different numbers of tokens)."""


def cpu_ns(pids: Iterable[int], skip: Iterable[int] = ()) -> int:
    """CPU time, in ns, run so far by every thread of `pids` except the thread ids in `skip`
    (/proc/PID/task/TID/schedstat: nanoseconds, where /proc/PID/stat counts 10 ms ticks). 0 off Linux."""
    total, skip = 0, set(skip)
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            if int(tid) in skip:
                continue
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that ended between the listing and the read
    return total


def machine_busy_s() -> float:
    """Seconds the CPUs this process may run on have been busy (or stolen by the hypervisor) since boot,
    from /proc/stat; 0 off Linux."""
    try:
        allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except (OSError, AttributeError):
        return 0.0
    ticks = 0
    for fields in lines:
        if fields[0] in allowed:  # user nice system idle iowait irq softirq steal ...
            ticks += sum(int(v) for v in fields[1:4]) + sum(int(v) for v in fields[6:9])
    return ticks / os.sysconf("SC_CLK_TCK")


class Quiet:
    """Called after a contender: waits until the threads of `pids` (this process's, less the calling thread,
    and a worker's) run less than `idle` of a core over `window` seconds, at most `timeout` seconds; returns
    the seconds waited. `timeouts` counts the waits that ran out."""

    def __init__(self, pids: Iterable[int], window: float = 0.005, idle: float = 0.05, timeout: float = 2.0):
        self.pids, self.window, self.idle, self.timeout = list(pids), window, idle, timeout
        self.timeouts = 0

    def __call__(self) -> float:
        me = [threading.get_native_id()]
        start = time.perf_counter()
        before = cpu_ns(self.pids, me)
        while True:
            t = time.perf_counter()
            time.sleep(self.window)
            now = cpu_ns(self.pids, me)
            elapsed = time.perf_counter() - t
            if now - before <= self.idle * elapsed * 1e9:
                return time.perf_counter() - start
            if time.perf_counter() - start > self.timeout:
                self.timeouts += 1
                return time.perf_counter() - start
            before = now


def compare(
    contenders: dict[str, Callable[[], object]],
    rounds: int = 7,
    warmup: int = 2,
    same_work: bool = True,
    settle: Optional[Quiet] = None,
    alone: int = 0,
    pids: Optional[Iterable[int]] = None,
) -> dict[str, dict]:
    """Time each contender `rounds` times, interleaved. A contender returns the work it did (tokens); with
    `same_work`, every contender must return the same work in every round, or UnequalWork is raised.

    `settle` is called after every call (the next contender starts only when the race's threads are idle).
    With `alone`, each contender is then also run `alone` times back to back, the others idle, as a sanity
    figure. `pids` (default: this process; `settle`'s when given) are the race's processes: the CPU time the
    machine spent outside them during each contender's timed calls is its `others_cores`."""
    names = list(contenders)
    pids = list(pids) if pids is not None else (settle.pids if settle else [os.getpid()])
    for _ in range(warmup):
        for n in names:
            contenders[n]()
            if settle:
                settle()
    times: dict[str, list[float]] = {n: [] for n in names}
    work: dict[str, list[object]] = {n: [] for n in names}
    waits: dict[str, list[float]] = {n: [] for n in names}
    others: dict[str, float] = {n: 0.0 for n in names}  # core-seconds of other processes during n's calls

    def timed(n: str) -> tuple[object, float]:
        busy, ours = machine_busy_s(), cpu_ns(pids)
        t = time.perf_counter()
        done = contenders[n]()
        elapsed = time.perf_counter() - t
        others[n] += max(0.0, machine_busy_s() - busy - (cpu_ns(pids) - ours) / 1e9)
        return done, elapsed

    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            done, elapsed = timed(n)
            work[n].append(done)
            times[n].append(elapsed)
            if settle:
                waits[n].append(settle())
        if same_work and len({work[n][-1] for n in names}) > 1:
            raise UnequalWork(
                f"round {r}: the contenders did different work: " + ", ".join(f"{n}={work[n][-1]}" for n in names)
            )
    out = {n: {"median_s": statistics.median(ts), "times_s": ts, "work": work[n]} for n, ts in times.items()}
    for n in names:
        if alone:
            calls = [timed(n)[1] for _ in range(alone)]  # back to back: only its own threads between calls
            out[n]["alone_s"] = calls
            if settle:
                settle()
        spent = sum(times[n]) + sum(out[n].get("alone_s", ()))
        # /proc/stat counts 10 ms ticks: over less than half a second of calls the share is noise, not a figure
        out[n]["others_cores"] = others[n] / spent if spent >= 0.5 else None
        if settle:
            out[n]["settle_s"] = waits[n]
            out[n]["unsettled"] = settle.timeouts
    return out


def ratio(result: dict[str, dict], ours: str, peer: str) -> tuple[float, float]:
    """(median, interquartile range) over rounds of peer_time / our_time (> 1: we are faster)."""
    r = sorted(p / o for p, o in zip(result[peer]["times_s"], result[ours]["times_s"]))
    if len(r) < 4:
        return statistics.median(r), r[-1] - r[0]
    q = statistics.quantiles(r, n=4)
    return statistics.median(r), q[2] - q[0]


def unreliable(result: dict[str, dict], ours: str, peer: str) -> Optional[str]:
    """Why the ratio of `peer` to `ours` does not hold (None when it does): a contender's alone figure and its
    interleaved median disagree by more than AGREE, the ratio's IQR exceeds SPREAD of its median, other
    processes took more than BUSY cores during a contender's calls, or a contender's threads never went idle."""
    why = []
    for name in (ours, peer):
        r = result[name]
        if r.get("alone_s"):
            a, i = statistics.median(r["alone_s"]), r["median_s"]
            if max(a, i) > AGREE * min(a, i):
                why.append(f"{name} alone {a:.3g} s vs {i:.3g} s interleaved (over {AGREE}x apart)")
        if (r.get("others_cores") or 0.0) > BUSY:
            why.append(f"other processes took {r['others_cores']:.2f} cores during {name}'s calls (over {BUSY})")
        if r.get("unsettled"):
            why.append(f"{name}'s race: threads still busy after {r['unsettled']} waits ran out")
    median, iqr = ratio(result, ours, peer)
    if iqr > SPREAD * median:
        why.append(f"ratio {median:.2f} with IQR {iqr:.2f} (over {SPREAD:.0%} of it)")
    return "; ".join(why) or None
