"""Dynamic batching: requests that arrive together are decoded together, by one worker thread per model.

Request handlers (on the server's event loop) submit `Job`s and await their futures; the worker takes the
waiting job that is due first (small jobs before large ones that came a little earlier: see `Batcher.due`),
keeps collecting for at most `max_wait_ms` or until `max_batch_tokens` source tokens (or `max_batch` texts)
are gathered, groups the jobs that can run as one call (same kind, same decoding settings),
runs each group through the library's own functions, and hands every job exactly its own results. One worker,
so the CPU's cores run one model call at a time (its own threads), never several fighting over them. A job
whose client went away is dropped before it is run (and a running translation stops at its next step).
Generation jobs ("complete") go to a continuous batcher (`continuous.py`) that the same worker advances one
step at a time, the other batches running between its steps.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

from ..generate import DecodingCancelled

log = logging.getLogger("transformer")


@dataclass
class Job:
    """Work for the model: `kind` ("translate", "classify", "embed", "attention", or "complete": generation),
    its `texts`, the `settings` that must match for jobs to share a batch (`generate.DecodingSettings`, None, or
    for "complete" a `continuous.Completion`), and the `tokens` it adds to a batch."""

    kind: str
    texts: list[str]
    settings: Hashable = None
    tokens: int = 1
    loop: Optional[asyncio.AbstractEventLoop] = None
    future: Optional[asyncio.Future] = None
    stream: Optional[asyncio.Queue] = None  # a streamed generation's events, then None
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)

    def deliver(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        """Hand the result (or the error) to the waiting handler, from the worker thread."""
        if self.loop is None or self.future is None:
            return

        def settle() -> None:
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)

    def emit(self, piece: Optional[str]) -> None:
        """Stream one piece of generated text (None: the end) to the waiting handler."""
        if self.loop is not None and self.stream is not None:
            self.loop.call_soon_threadsafe(self.stream.put_nowait, piece)


class QueueFull(Exception):
    """The batcher holds `max_queue` waiting jobs already: the server answers 429, try again later."""


class Batcher:
    """The worker thread and its queue. `run(kind, settings, texts, jobs, pause)` computes one group: it returns
    one result per text (sliced back to the jobs here), calling `pause()` between its decoding steps (True: stop,
    raising generate.DecodingCancelled; see `_pause`). Jobs of kind "complete" go to `pool` (a
    `continuous.ContinuousBatcher`), which the worker advances one decoding step at a time, with the other
    kinds' batches run between steps. At most `max_queue` jobs wait (beyond that `submit` raises QueueFull).
    Waiting jobs run in the order they are due: a job of n tokens is due n x `ms_per_token` after it arrived
    (0: in arrival order)."""

    def __init__(
        self,
        run: Callable[[str, Hashable, list[str], list[Job], Callable[[], bool]], list],
        max_batch_tokens: int,
        max_wait_ms: float,
        max_batch: int,
        pool=None,
        max_queue: int = 256,
        slice_ms: float = 10.0,
        ms_per_token: float = 0.1,
    ) -> None:
        self.run, self.max_tokens, self.max_wait, self.max_batch = run, max_batch_tokens, max_wait_ms / 1000, max_batch
        self.pool, self.max_queue = pool, max_queue
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.held: list[Job] = []  # taken from the queue and not run yet, in the order they are due
        self.per_token = ms_per_token / 1000
        self.batches = 0  # model calls made (for /v1/model and the tests)
        self.closing = False
        self.slice, self._since, self._inside = slice_ms / 1000, 0.0, False  # see _pause
        self.on_death: Optional[Callable[[BaseException], None]] = None  # told if the worker thread dies
        self.thread = threading.Thread(target=self._live, name="decoding-worker", daemon=True)
        self.thread.start()

    def waiting(self) -> int:
        """Jobs submitted and not started yet (approximate: read from another thread)."""
        return self.queue.qsize() + len(self.held) + (len(self.pool.pending) if self.pool is not None else 0)

    def submit(self, job: Job) -> None:
        if self.waiting() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are waiting already (--max-queue)")
        self.queue.put(job)

    def close(self, timeout: float = 60.0) -> None:
        """Finish what is queued and being generated, then stop the worker."""
        self.queue.put(None)
        self.thread.join(timeout)

    def _live(self) -> None:
        try:
            self._work()
        except BaseException as e:  # a bug, or memory exhausted: nothing can be served any more
            log.critical("the decoding worker died: %r", e, exc_info=True)
            if self.on_death is not None:
                self.on_death(e)

    def _work(self) -> None:
        while True:
            generating = self.pool is not None and self.pool.busy
            jobs = self._collect(wait=not generating)
            if jobs is None:
                return
            for job in jobs:
                if job.kind == "complete":
                    self.pool.add(job)
            for group in self._groups([j for j in jobs if j.kind != "complete"]):
                self._run_group(group)
            if self.pool is not None and self.pool.busy:
                self._advance()

    def _advance(self) -> None:
        try:
            self.pool.advance()
        except Exception as e:  # every job in the pool is answered with the error; the worker goes on
            log.exception("generation failed")
            for job in self.pool.abandon():
                job.deliver(error=e)
                job.emit(e)

    def due(self, job: Job) -> float:
        """When `job` should run: its arrival, later by `ms_per_token` for each of its tokens. A sentence is due
        at once and goes before the parts of a long request that came shortly before it (4096 token slots: in
        the next 0.4 s at the default), which then go before those that come after that: large requests make
        way for small ones, for a while, and are never left behind for ever."""
        return job.arrived + job.tokens * self.per_token

    def _hold(self, job: Job) -> None:
        bisect.insort(self.held, job, key=self.due)

    def _collect(self, wait: bool = True) -> Optional[list[Job]]:
        """The next batch of jobs: at least one (waiting for it) if `wait`, more while they fit and time allows;
        without `wait` (sequences are being generated), only those already queued. None: stop now."""
        self._take_queued()
        jobs: list[Job] = []
        while self.held and (not jobs or self._fits(jobs, self.held[0])):  # the jobs due first
            jobs.append(self.held.pop(0))
        free = time.perf_counter()
        if not jobs and wait:
            if self.closing:
                return None
            first = self.queue.get()
            if first is None:
                return None
            jobs = [first]
        deadline = free if not jobs else max(jobs[0].arrived, free) + self.max_wait
        if not wait or self.held or self.closing or jobs[0].kind == "complete":
            # the running sequences' next step waits for nobody, nor do jobs that waited already, and a
            # generation need not wait for company: whoever comes later joins it at its next step
            deadline = free
        # Wait at most max_wait from when the first job arrived or the worker came free, whichever is later:
        # under load the clients just answered are sending their next requests, and a batch that waits a few
        # milliseconds for them replaces the next, smaller one (two half batches cost nearly twice one).
        while not self.held and self._fits(jobs):
            try:
                nxt = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if nxt is None:
                self.closing = True  # stop once this batch and the sequences being generated are done
                break
            if nxt.kind != "complete" and not self._fits(jobs, nxt):
                self._hold(nxt)
                break
            jobs.append(nxt)
        return [j for j in jobs if not j.cancelled]

    def _fits(self, jobs: list[Job], more: Optional[Job] = None) -> bool:
        """Whether `jobs` (and `more`) stay under the batch's token and text budgets (at the budget: full)."""
        extra = [] if more is None else [more]
        tokens = sum(j.tokens for j in jobs + extra)
        texts = sum(len(j.texts) for j in jobs + extra)
        if more is None:
            return tokens < self.max_tokens and texts < self.max_batch
        return more.kind == "complete" or (tokens <= self.max_tokens and texts <= self.max_batch)

    def _pause(self, group: list[Job]) -> bool:
        """Called by a batch between its decoding steps: True abandons it (every client gone or out of time).
        A batch that has run for `slice` seconds first lets the small jobs waiting that are due before it (a
        sentence or a few, a tenth of the token budget at most) run as their own batches, so that a long batch
        (64 texts at beam 16, the longest outputs) delays the requests behind it by a slice, not by all of it."""
        if all(j.cancelled for j in group):
            return True
        if self._inside or time.perf_counter() - self._since < self.slice:
            return False
        self._inside = True
        try:
            self._take_queued()
            small, budget, due = [], self.max_tokens, min(self.due(j) for j in group)
            for j in self.held:
                if j.kind in ("translate", "classify", "embed") and j.tokens <= self.max_tokens // 10:
                    if j.tokens > budget or self.due(j) > due:
                        break
                    small.append(j)
                    budget -= j.tokens
            self.held = [j for j in self.held if all(j is not k for k in small)]
            for g in self._groups([j for j in small if not j.cancelled]):
                self._run_group(g)
        finally:
            self._inside = False
            self._since = time.perf_counter()
        return False

    def _take_queued(self) -> None:
        """Everything queued now, into `held` (in the order they are due)."""
        while True:
            try:
                nxt = self.queue.get_nowait()
            except queue.Empty:
                return
            if nxt is None:
                self.closing = True
            else:
                self._hold(nxt)

    @staticmethod
    def _groups(jobs: list[Job]) -> list[list[Job]]:
        """Jobs that can be one call: the same kind and settings; generation and attention one at a time."""
        groups: dict[tuple, list[Job]] = {}
        for j in jobs:
            key = (j.kind, j.settings) if j.kind in ("translate", "classify", "embed") else (j.kind, id(j))
            groups.setdefault(key, []).append(j)
        return list(groups.values())

    def _run_group(self, group: list[Job]) -> None:
        group = [j for j in group if not j.cancelled]  # clients gone while this batch was collected
        if not group:
            return
        texts = [t for j in group for t in j.texts]
        if not self._inside:
            self._since = time.perf_counter()
        try:
            results = self.run(group[0].kind, group[0].settings, texts, group, lambda: self._pause(group))
            self.batches += 1
        except DecodingCancelled as e:  # every client gone, or out of time: nobody waits for an answer
            log.info("%s", e)
            for j in group:
                j.deliver(error=e)
            return
        except Exception as e:  # the handlers turn it into an error response; the worker goes on
            log.exception("decoding failed")
            for j in group:
                j.deliver(error=e)
            return
        start = 0
        for j in group:
            j.deliver(results[start : start + len(j.texts)])
            start += len(j.texts)
