"""Continuous batching for a language model: every sequence being generated advances one token per step, in one
batch; a new request joins at the next step and a finished (or abandoned) one leaves at once.

    pending requests --admit (prefill their prompts together)--> rows of one DecoderCache --step--> tokens

The rows share one KV cache (`DecoderCache.join`): right-aligned, so one decoding step serves rows of any length,
each row's padding masked and its positions its own. The cache is held to a fixed budget: a row reserves its
prompt plus its `max_tokens`, the rows are as wide as the widest reservation, and a request is admitted only
while rows x width <= `max_kv_tokens` (it waits in the queue until then). Each row samples with its own
temperature, top-k/top-p, random generator (a `seed` gives the same text as `generate.sample` with that seed)
and stop strings.

A `Completion` is one request (its prompt's ids, `n` choices); the pool answers it through its `Job`: each text
piece as (choice, text, finish_reason or None, tokens so far) on the job's stream, then None; or all choices at
the end, as dicts (index, text, finish_reason, tokens).
"""

from __future__ import annotations

import collections
import logging
import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..cpu.lm_step import lm_step_decoder
from ..generate import TextStream, pick_next
from ..tokenizers import Tokenizer
from .batcher import Job

log = logging.getLogger("transformer")


@dataclass(frozen=True)
class Completion:
    """One generation request: `prompt` ids, `n` choices of at most `max_tokens` tokens each, sampled at
    `temperature` (0: greedy) within `top_k`/`top_p`; `seed` (None: a random one) seeds choice i with seed + i;
    a choice ends at the model's end ids or at the first of the `stop` strings (not included)."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    first_index: int = 0  # the choices are numbered from here (a request of several prompts: one job each)

    @property
    def reserved(self) -> int:
        """The cache positions each of its rows may fill."""
        return len(self.prompt) + self.max_tokens


class _Row:
    """One choice being generated: its sampling state, its text so far and how much of it was sent."""

    def __init__(self, job: Job, index: int, tokenizer: Tokenizer, seed: int) -> None:
        self.job, self.index, self.request = job, index, job.settings
        self.generator = torch.Generator().manual_seed((seed + index) % 2**64)
        self.stream = TextStream(tokenizer, self.request.prompt)
        self.text, self.sent, self.tokens = "", 0, 0
        self.next: Optional[int] = None  # the token sampled last, fed at the next step
        self.finish: Optional[str] = None  # "stop" or "length" once done

    def push(self, token: int, eos: frozenset) -> None:
        """Take the token sampled for this row: the end of the choice, or text (up to a stop string)."""
        self.next = token
        if token in eos:
            self.finish = "stop"
            return
        self.tokens += 1
        self.text += self.stream.push(token)
        for s in self.request.stop:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.text, self.finish = self.text[:at], "stop"
        if self.finish is None and self.tokens >= self.request.max_tokens:
            self.finish = "length"

    def ready(self) -> str:
        """The text not sent yet that no stop string can still claim (all of it once finished)."""
        end = len(self.text)
        if self.finish is None:  # hold back a tail that may be the start of a stop string
            end -= max((k for s in self.request.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece


class ContinuousBatcher:
    """The rows being generated for a decoder-only model, advanced together one token per `advance()`.

    `add(job)` queues a job whose settings are a `Completion`; `advance()` (from the one worker thread) drops
    rows whose client went away, admits what the budget allows (reading their prompts in one pass), and runs
    one decoding step for every row. `context` wraps each model call (inference mode, bf16 autocast)."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        max_kv_tokens: int,
        max_rows: int,
        context: Callable = torch.inference_mode,
    ) -> None:
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.max_kv_tokens, self.max_rows = max_kv_tokens, max_rows
        self.eos = frozenset(model.config.eos_ids)
        self.pending: collections.deque[Job] = collections.deque()
        self.rows: list[_Row] = []
        self.finished: dict[int, list[_Row]] = {}  # the done rows of jobs that still have rows running
        self.cache = None  # the rows' DecoderCache, None while there are none
        self.steps = 0  # decoding steps run (for /v1/model and the tests)
        self.device = next(model.parameters()).device

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.pending)

    def add(self, job: Job) -> None:
        self.pending.append(job)

    def fits(self, request: Completion) -> bool:
        """Whether `request` could ever be admitted (alone): rows x width within the budget and the row limit."""
        return request.n * request.reserved <= self.max_kv_tokens and request.n <= self.max_rows

    def advance(self) -> None:
        """One round: drop abandoned rows, admit what fits, one token for every row."""
        with self.context():
            self._drop([r for r in self.rows if r.job.cancelled])
            self._admit()
            if self.rows:
                self._step()

    def _width(self, extra: Optional[Completion] = None) -> int:
        return max([r.request.reserved for r in self.rows] + ([extra.reserved] if extra else []), default=0)

    def _admit(self) -> None:
        """Admit pending jobs while rows x width stays within the budget (in arrival order: a large request is
        not overtaken forever by small ones), their prompts read in one left-padded pass."""
        admitted: list[Job] = []
        while self.pending:
            job = self.pending[0]
            if job.cancelled:
                self.pending.popleft()
                continue
            req = job.settings
            rows = len(self.rows) + sum(j.settings.n for j in admitted) + req.n
            width = max(self._width(req), *(j.settings.reserved for j in admitted), 0)
            if rows > self.max_rows or rows * width > self.max_kv_tokens:
                break
            admitted.append(self.pending.popleft())
        if admitted:
            self._prefill(admitted)

    def _prefill(self, jobs: list[Job]) -> None:
        prompts = [list(j.settings.prompt) for j in jobs]
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        cache = self.model.decoder.new_cache(longest)
        logits = self.model(ids, cache, attention_mask=mask.bool(), last_only=True)[:, -1]  # (jobs, V)
        index = torch.tensor([i for i, j in enumerate(jobs) for _ in range(j.settings.n)], device=self.device)
        new = [
            _Row(j, c, self.tokenizer, j.settings.seed if j.settings.seed is not None else random.getrandbits(62))
            for j in jobs
            for c in range(j.settings.n)
        ]
        self._sample(new, logits.index_select(0, index))
        cache.join(None, longest, keep=index)  # each job's prompt row repeated for its choices (copied, not recomputed)
        if self.cache is None:
            self.cache = self.model.decoder.new_cache(1)
        self.cache.join(cache, self._width(max((j.settings for j in jobs), key=lambda r: r.reserved)))
        self.rows += new
        self._drop([r for r in new if r.finish is not None])

    def _step(self) -> None:
        """One token for every row: the last sampled tokens in, the next ones sampled."""
        if self.cache.length >= self.cache.layers[0][0].k.size(2):  # full: drop the columns no row needs
            self.cache.join(None, self._width())
        last = torch.tensor([r.next for r in self.rows], device=self.device)
        fast = lm_step_decoder(self.model)
        logits = fast.step(last, self.cache) if fast is not None else self.model(last[:, None], self.cache)[:, -1]
        self.steps += 1
        self._sample(self.rows, logits)
        self._drop([r for r in self.rows if r.finish is not None])

    def _sample(self, rows: list[_Row], logits: Tensor) -> None:
        """Each row's next token, with its own settings and generator; the text it adds goes to its client."""
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            s = row.request
            token = (
                greedy[i]
                if s.temperature == 0
                else int(pick_next(logits[i : i + 1], s.temperature, s.top_k, s.top_p, row.generator)[0])
            )
            row.push(token, self.eos)
            piece = row.ready()
            if row.job.stream is not None and (piece or row.finish):
                row.job.emit((s.first_index + row.index, piece, row.finish, row.tokens))

    def _drop(self, gone: list[_Row]) -> None:
        """Rows that finished or whose client went away leave the batch; a job whose rows are all done is
        answered."""
        if not gone:
            return
        ids = {id(r) for r in gone}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in ids]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None  # the next request starts from an empty cache, as it would alone
        elif self.cache is not None:
            self.cache.join(None, self._width(), torch.tensor(keep, device=self.device))
        for row in gone:
            self.finished.setdefault(id(row.job), []).append(row)
        for job in {id(r.job): r.job for r in gone}.values():
            if not any(r.job is job for r in self.rows):
                done = self.finished.pop(id(job))
                if not job.cancelled:  # nobody waits for a cancelled job's answer
                    self._answer(job, done)

    def _answer(self, job: Job, rows: list[_Row]) -> None:
        if job.stream is not None:
            job.emit(None)
            return
        rows = sorted(rows, key=lambda r: r.index)
        first = job.settings.first_index
        job.deliver(
            [{"index": first + r.index, "text": r.text, "finish_reason": r.finish, "tokens": r.tokens} for r in rows]
        )

    def abandon(self) -> list[Job]:
        """Forget every row and pending job (after a failed step), returning their jobs to be answered."""
        jobs = {id(r.job): r.job for r in self.rows} | {id(j): j for j in self.pending}
        self.rows, self.pending, self.cache, self.finished = [], collections.deque(), None, {}
        return list(jobs.values())
