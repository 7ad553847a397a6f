"""transformer.serve.batcher: which jobs share a model call, and every job gets exactly its own results.

No test depends on timing: the batcher waits up to a minute for more jobs (max_wait_ms), and every test
submits all its jobs and then closes the batcher, whose stop signal queues behind them: a batch ends when it
is full or when the stop signal arrives, never because a clock ran out. Jobs run in arrival order
(ms_per_token=0) but in the tests of the order by due time, which set the jobs' arrival times themselves.
"""

import asyncio
import threading
import time

import pytest

from transformer.generate import DecodingCancelled
from transformer.serve.batcher import Batcher, Job, QueueFull

FOREVER_MS = 60_000


class Recorder:
    """A `run` function: records each call and answers each text with "<kind>:<settings>:<text>"."""

    def __init__(self, fail_kinds=()):
        self.calls = []
        self.fail_kinds = fail_kinds

    def __call__(self, kind, settings, texts, jobs, pause=None):
        self.calls.append((kind, settings, list(texts), list(jobs)))
        if kind in self.fail_kinds:
            raise RuntimeError(f"{kind} failed")
        return [f"{kind}:{settings}:{t}" for t in texts]


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def job(loop, kind="translate", texts=("a",), settings=None, tokens=1, stream=False):
    return Job(
        kind,
        list(texts),
        settings,
        tokens,
        loop=loop,
        future=loop.create_future(),
        stream=asyncio.Queue() if stream else None,
    )


def run_all(loop, jobs, max_batch_tokens=1000, max_batch=1000, fail_kinds=()):
    """Submit `jobs`, let the worker finish them, and settle their futures on `loop`. Returns the Recorder
    and the batcher."""
    run = Recorder(fail_kinds)
    batcher = Batcher(run, max_batch_tokens, FOREVER_MS, max_batch, ms_per_token=0)
    for j in jobs:
        batcher.submit(j)
    batcher.close(timeout=30)
    assert not batcher.thread.is_alive()
    loop.run_until_complete(asyncio.sleep(0))  # run the settle callbacks the worker scheduled
    return run, batcher


def batches(run):
    """The jobs of each model call, in order."""
    return [call[3] for call in run.calls]


def test_jobs_of_one_kind_and_settings_share_one_call_and_get_their_own_results(loop):
    jobs = [job(loop, texts=["a"]), job(loop, texts=["b", "c"]), job(loop, texts=["d"])]
    run, batcher = run_all(loop, jobs)
    assert batches(run) == [jobs]
    assert run.calls[0][:3] == ("translate", None, ["a", "b", "c", "d"])  # the texts in submission order
    assert [j.future.result() for j in jobs] == [
        ["translate:None:a"],
        ["translate:None:b", "translate:None:c"],
        ["translate:None:d"],
    ]
    assert batcher.batches == 1


def test_each_result_goes_to_the_job_of_its_text_even_with_equal_texts(loop):
    # results depend on the position, not the text: a mix-up between jobs with equal texts would show
    counter = iter(range(100))
    jobs = [job(loop, texts=["x", "x"]), job(loop, texts=["x"]), job(loop, texts=["x", "x", "x"])]
    batcher = Batcher(lambda kind, settings, texts, js, pause: [next(counter) for _ in texts], 1000, FOREVER_MS, 1000)
    for j in jobs:
        batcher.submit(j)
    batcher.close(timeout=30)
    loop.run_until_complete(asyncio.sleep(0))
    assert [j.future.result() for j in jobs] == [[0, 1], [2], [3, 4, 5]]


def test_other_settings_or_kinds_make_separate_calls(loop):
    a1, b1 = job(loop, settings=("beam", 4)), job(loop, settings=("beam", 1))
    a2 = job(loop, settings=("beam", 4), texts=["z"])
    c = job(loop, kind="classify")
    e = job(loop, kind="embed")
    run, batcher = run_all(loop, [a1, b1, a2, c, e])
    # grouped by (kind, settings), groups in the order of their first job, jobs in submission order
    assert batches(run) == [[a1, a2], [b1], [c], [e]]
    assert [call[:3] for call in run.calls] == [
        ("translate", ("beam", 4), ["a", "z"]),
        ("translate", ("beam", 1), ["a"]),
        ("classify", None, ["a"]),
        ("embed", None, ["a"]),
    ]
    assert a2.future.result() == ["translate:('beam', 4):z"]
    assert batcher.batches == 4


def test_attention_jobs_never_share_a_call(loop):
    kind = "attention"
    jobs = [job(loop, kind=kind, settings="same", texts=[t]) for t in "abc"]
    run, batcher = run_all(loop, jobs)
    assert batches(run) == [[j] for j in jobs]
    assert [j.future.result() for j in jobs] == [[f"{kind}:same:{t}"] for t in "abc"]
    assert batcher.batches == 3


def test_a_batch_stops_before_the_token_budget_is_exceeded(loop):
    jobs = [job(loop, tokens=4) for _ in range(5)]
    run, _ = run_all(loop, jobs, max_batch_tokens=10)
    # 4 + 4 = 8 fits, a third would make 12 > 10: it waits for the next batch
    assert batches(run) == [jobs[0:2], jobs[2:4], jobs[4:5]]
    assert all(j.future.done() and not j.future.exception() for j in jobs)


def test_a_batch_that_reaches_the_budget_exactly_takes_no_more(loop):
    jobs = [job(loop, tokens=5), job(loop, tokens=5), job(loop, tokens=1)]
    run, _ = run_all(loop, jobs, max_batch_tokens=10)
    assert batches(run) == [jobs[0:2], jobs[2:3]]


def test_a_job_larger_than_the_budget_still_runs_alone(loop):
    jobs = [job(loop, tokens=50), job(loop, tokens=1)]
    run, _ = run_all(loop, jobs, max_batch_tokens=10)
    assert batches(run) == [[jobs[0]], [jobs[1]]]
    assert jobs[0].future.result() == ["translate:None:a"]


def test_a_batch_holds_at_most_max_batch_texts(loop):
    jobs = [job(loop, texts=["a", "b"]), job(loop, texts=["c", "d"]), job(loop, texts=["e"])]
    run, _ = run_all(loop, jobs, max_batch=3)
    # 2 + 2 > 3: the second job waits; then 2 + 1 = 3 fits
    assert batches(run) == [[jobs[0]], [jobs[1], jobs[2]]]
    assert [j.future.result() for j in jobs] == [
        ["translate:None:a", "translate:None:b"],
        ["translate:None:c", "translate:None:d"],
        ["translate:None:e"],
    ]


def test_a_failing_call_reaches_the_jobs_of_that_call_only(loop):
    t1, c1, t2, c2 = job(loop), job(loop, kind="classify"), job(loop, texts=["b"]), job(loop, kind="classify")
    later = job(loop, kind="embed")
    run, batcher = run_all(loop, [t1, c1, t2, c2, later], fail_kinds=("classify",))
    assert batches(run) == [[t1, t2], [c1, c2], [later]]  # the worker went on after the failure
    assert t1.future.result() == ["translate:None:a"] and t2.future.result() == ["translate:None:b"]
    for j in (c1, c2):
        with pytest.raises(RuntimeError, match="classify failed"):
            j.future.result()
    assert later.future.result() == ["embed:None:a"]
    assert batcher.batches == 2  # only the calls that returned count


def test_cancelled_jobs_are_not_run(loop):
    gone, kept = job(loop, texts=["gone"]), job(loop, texts=["kept"])
    gone.cancelled = True
    alone = job(loop, texts=["alone"])
    alone.cancelled = True
    run, _ = run_all(loop, [gone, kept])
    assert batches(run) == [[kept]] and run.calls[0][2] == ["kept"]
    assert not gone.future.done()
    run, batcher = run_all(loop, [alone])
    assert run.calls == [] and batcher.batches == 0


class FakePool:
    """A continuous batcher that answers each job after `steps` rounds, and fails its round `fail_at`."""

    def __init__(self, steps=3, fail_at=None, log=None, until=lambda: True):
        self.pending, self.rows, self.steps, self.fail_at, self.rounds = [], [], steps, fail_at, 0
        self.log, self.until = log if log is not None else [], until

    @property
    def busy(self):
        return bool(self.pending or self.rows)

    def add(self, job):
        self.pending.append(job)

    def advance(self):
        self.rounds += 1
        if self.rounds == self.fail_at:
            raise RuntimeError("step failed")
        self.rows += [[j, 0] for j in self.pending]
        self.pending = []
        for row in self.rows:
            row[1] += 1
            self.log.append(("step", row[0].texts[0]))
        done = [r for r in self.rows if r[1] >= self.steps and self.until()]
        for j, _ in done:
            j.deliver([f"done:{j.texts[0]}"])
        self.rows = [r for r in self.rows if r not in done]

    def abandon(self):
        jobs = [r[0] for r in self.rows] + self.pending
        self.rows, self.pending = [], []
        return jobs


def test_generation_goes_to_the_pool_and_other_batches_run_between_its_steps(loop):
    log, run = [], Recorder()

    def recorded(kind, settings, texts, jobs, pause):
        log.append(("call", texts[0]))
        return run(kind, settings, texts, jobs)

    pool = FakePool(log=log, until=lambda: ("call", "t") in log)  # the generation lasts until the text has run
    gen, text = job(loop, kind="complete", texts=["g"]), job(loop, texts=["t"])
    batcher = Batcher(recorded, 1000, 0, 1000, pool)
    batcher.submit(gen)
    while not log:  # the generation is under way
        time.sleep(0.001)
    batcher.submit(text)
    batcher.close(timeout=30)
    loop.run_until_complete(asyncio.sleep(0))
    assert gen.future.result() == ["done:g"] and text.future.result() == ["translate:None:t"]
    call = log.index(("call", "t"))
    assert ("step", "g") in log[:call] and ("step", "g") in log[call:]  # steps before and after the call
    assert [c[2] for c in run.calls] == [["t"]]  # the generation never went through `run`


def test_a_failed_step_answers_every_generation_with_the_error(loop):
    pool = FakePool(steps=5, fail_at=2)
    a, b = job(loop, kind="complete", texts=["a"]), job(loop, kind="complete", texts=["b"], stream=True)
    batcher = Batcher(Recorder(), 1000, 0, 1000, pool)
    batcher.submit(a)
    batcher.submit(b)
    batcher.close(timeout=30)
    loop.run_until_complete(asyncio.sleep(0))
    with pytest.raises(RuntimeError, match="step failed"):
        a.future.result()
    assert isinstance(b.stream.get_nowait(), RuntimeError)  # a stream is told (an error event, then the end)
    assert isinstance(b.future.exception(), RuntimeError)
    assert not pool.busy and batcher.thread.is_alive() is False  # closed cleanly after the failure


def test_the_queue_is_bounded(loop):
    block = threading.Event()
    batcher = Batcher(lambda *a: block.wait(30) and [], 1000, 0, 1000, max_queue=2)
    first = job(loop)
    batcher.submit(first)
    while batcher.queue.qsize():  # the worker took the first and is stuck in it
        time.sleep(0.001)
    batcher.submit(job(loop))
    batcher.submit(job(loop))
    with pytest.raises(QueueFull, match="--max-queue"):
        batcher.submit(job(loop))
    block.set()
    batcher.close(timeout=30)


def test_a_job_settles_only_once_and_a_job_without_a_loop_is_ignored(loop):
    j = job(loop)
    j.deliver(["first"])
    j.deliver(error=RuntimeError("late"))
    loop.run_until_complete(asyncio.sleep(0))
    assert j.future.result() == ["first"]
    Job("translate", ["a"]).deliver(["x"])  # no loop, no future: nothing to do, no error
    Job("translate", ["a"]).emit("x")


def test_small_jobs_run_between_the_steps_of_a_long_batch(loop):
    """A batch that has run for a slice (here 0 ms) lets the small waiting jobs due before it run at its next
    step; a big waiting job, or a small one due after it, waits for it to end; and a batch whose clients have
    all gone is abandoned at its next step."""
    order, started = [], threading.Event()

    def run(kind, settings, texts, jobs, pause):
        order.append(texts[0])
        if texts[0] in ("long", "abandoned"):
            started.set()
            for _ in range(10_000):  # the long batch's decoding steps
                if pause():
                    raise DecodingCancelled("abandoned")
                if "small" in order:
                    break
                time.sleep(0.001)
            order.append(f"{texts[0]} done")
        return list(texts)

    long, big = job(loop, texts=["long"], tokens=500), job(loop, texts=["big"], tokens=500)
    small, late = job(loop, texts=["small"]), job(loop, texts=["late"], settings="other")
    # at 1 ms a token, due at 100.5 (long), 100.6 (big), 100.101 (small) and 100.901 (late)
    long.arrived, big.arrived, small.arrived, late.arrived = 100.0, 100.1, 100.1, 100.9
    batcher = Batcher(run, 1000, 0, 1000, slice_ms=0, ms_per_token=1)
    batcher.submit(long)
    started.wait(30)
    for j in (late, big, small):
        batcher.submit(j)
    batcher.close(timeout=30)
    loop.run_until_complete(asyncio.sleep(0))
    assert order == ["long", "small", "long done", "big", "late"]
    assert [j.future.result() for j in (long, small, big, late)] == [["long"], ["small"], ["big"], ["late"]]
    gone = job(loop, texts=["abandoned"])
    order.clear()
    started.clear()
    batcher = Batcher(run, 1000, 0, 1000, slice_ms=0, ms_per_token=0)
    batcher.submit(gone)
    started.wait(30)
    gone.cancelled = True
    batcher.close(timeout=30)
    loop.run_until_complete(asyncio.sleep(0))
    assert order == ["abandoned"] and isinstance(gone.future.exception(), DecodingCancelled)


def blocked_batcher(loop, ms_per_token):
    """A batcher whose worker is busy with a first job until `release` is set: what is submitted meanwhile
    waits in its queue. Returns (batcher, release, order of the texts run)."""
    order, release = [], threading.Event()

    def run(kind, settings, texts, jobs, pause):
        order.append(texts[0])
        if texts[0] == "first":
            release.wait(30)
        return list(texts)

    batcher = Batcher(run, 1000, 0, 1000, ms_per_token=ms_per_token)
    batcher.submit(job(loop, texts=["first"]))
    while not order:
        time.sleep(0.001)
    return batcher, release, order


def test_small_jobs_go_before_large_ones_that_came_shortly_before_them(loop):
    """A job of n tokens is due n x ms_per_token after it arrived: a sentence (1 token) that arrives 0.5 s
    after a job of 1000 tokens at 1 ms a token runs first; one that arrives 1.5 s after it runs after it."""
    batcher, release, order = blocked_batcher(loop, ms_per_token=1)
    big, small, later = job(loop, texts=["big"], tokens=1000), job(loop, texts=["small"]), job(loop, texts=["later"])
    big.arrived, small.arrived, later.arrived = 100.0, 100.5, 101.5  # due at 101.0, 100.501 and 101.501
    for j in (big, later, small):
        batcher.submit(j)
    release.set()
    batcher.close(timeout=30)
    assert order == ["first", "small", "big", "later"]
    loop.run_until_complete(asyncio.sleep(0))
    assert [j.future.result() for j in (big, small, later)] == [["big"], ["small"], ["later"]]
