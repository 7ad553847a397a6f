"""One training loop for every task: schedule, precision, accumulation, validation, checkpoints, resume.

A run writes the run directory described in `rundir.py`. Resuming restores the model, optimizer, step, data
position (epoch, batch) and random states, so N steps + M resumed steps give the same parameters as N + M steps
in one go: batches are a pure function of (seed, epoch, index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from . import backend, rundir
from .checkpoint import (
    TrainingState,
    load_checkpoint,
    load_weights,
    read_training_state,
    save_checkpoint,
    training_state,
)
from .config import ModelConfig, RunConfig, TrainConfig, fine_tuned
from .cpu import memory, paths
from .distributed import (
    Distributed,
    data_parallel,
    full_state_dict,
    load_named_optimizer_state,
    named_optimizer_state,
)
from .errors import CheckpointError, TransformerError
from .files import check_output_dir
from .generate import DecodingSettings, translate_texts
from .lora import trainable_parameters
from .model import build_model, count_parameters
from .tasks import build_task

log = logging.getLogger("transformer")


def learning_rate(
    cfg: TrainConfig, step: int, total_steps: Optional[int] = None, peak: Optional[float] = None
) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup to the peak (`lr`, or `peak` for a
    parameter group of its own), then the schedule's decay, to `min_lr` (scaled alike) at `total_steps`
    (default `max_steps`) for "cosine" and "linear"."""
    peak = cfg.lr if peak is None else peak
    floor = cfg.min_lr * peak / cfg.lr
    warm = max(cfg.warmup_steps, 1)
    if step < warm:
        return peak * step / warm
    if cfg.schedule == "inverse_sqrt":  # the paper: d^-0.5 * min(step^-0.5, step * warmup^-1.5), peak = lr
        return peak * math.sqrt(warm / step)
    progress = min(1.0, (step - warm) / max(1, (total_steps or cfg.max_steps) - warm))
    if cfg.schedule == "cosine":
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return floor + (peak - floor) * (1 - progress)
    return peak


class TrainingInterrupted(TransformerError):
    """Training stopped by SIGINT/SIGTERM after saving a resumable checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class Position:
    """Where training is: what `last/` records and `--resume` restores."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    elapsed: float = 0.0  # seconds of training before this process
    best: Optional[float] = None  # best validation metric so far
    step_seconds: float = 0.0  # of the elapsed time, seconds spent in training steps (not validating, saving)
    bad_steps: int = 0  # non-finite steps in a row
    reached_target: bool = False  # the validation metric reached train.stop_at
    validated: Optional[dict] = None  # the last validation's figures (its "step": when it was)
    windows: dict = field(default_factory=dict)  # the figures summed since the last report / validation


@dataclass
class _Window:
    """Training figures summed since some point (the last progress report, the last validation)."""

    loss: float = 0.0  # summed over tokens
    tokens: int = 0
    norms: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, tokens: int, norm: float) -> None:
        self.loss += loss
        self.tokens += tokens
        self.norms.append(norm)

    def saved(self) -> dict[str, Any]:
        """What a resumed run needs to carry the window on (its clock starts again)."""
        return {"loss": self.loss, "tokens": self.tokens, "norms": list(self.norms)}


class _LossStep(nn.Module):
    """model + task.loss as one module, so DistributedDataParallel's forward sees the whole computation."""

    def __init__(self, model: nn.Module, task) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch):
        return self.task.loss(self.model, batch)


def adamw(
    model: nn.Module, t: TrainConfig, fused: bool = True, head: frozenset[str] = frozenset()
) -> torch.optim.Optimizer:
    """AdamW, with weight decay on matrices (projections, embeddings) only, never on biases and LayerNorm
    gains, and the peak learning rate `head_lr` for the parameters named in `head` (a new classification head
    on a pretrained model). Each group keeps its peak as "peak". The fused kernel updates each tensor in one
    pass (several times faster than the default on a CPU); `fused=False` for parameters it cannot take (FSDP's
    sharded ones)."""
    groups = []
    for is_head in (False, True):
        peak = (t.head_lr or t.lr) if is_head else t.lr
        # frozen parameters (a LoRA run's base weights) get no optimizer state at all
        chosen = [(n, p) for n, p in model.named_parameters() if (n in head) == is_head and p.requires_grad]
        for decay in (True, False):
            params = [p for n, p in chosen if (p.dim() >= 2) == decay]
            if params:
                groups.append(
                    {"params": params, "weight_decay": t.weight_decay if decay else 0.0, "lr": peak, "peak": peak}
                )
    fused = fused and next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=fused or None)


def sized_for(cfg: ModelConfig, tokenizers: dict) -> ModelConfig:
    """`cfg` with the vocabulary sizes of the task's tokenizers (a new, re-checked config)."""
    sizes = {f"{role}_vocab_size": tok.vocab_size for role, tok in tokenizers.items() if role in ("src", "tgt")}
    return dataclasses.replace(cfg, **sizes)


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy the tensors of `state` whose name and shape the model has; returns (the model's tensors not
    loaded, the state's tensors not used). Tied weights count once, under any of their names."""
    own = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, p in own.items():
        groups.setdefault(id(p), []).append(name)
    missing, used = [], set()
    with torch.no_grad():
        for names in groups.values():
            found = next((n for n in names if n in state and state[n].shape == own[n].shape), None)
            if found is None:
                missing.append(names[0])
                continue
            own[names[0]].copy_(state[found])
            used.update(n for n in names if n in state)
    return missing, sorted(set(state) - used)


class Trainer:
    """Trains a model described by a `RunConfig` into a run directory.

    Args:
        run: the recipe. Its fp32 variant is applied where precision resolves to fp32 (`self.run` is the recipe
            as it runs).
        out_dir: the run directory.
        resume: continue the run in `out_dir` from its `last/` checkpoint.
        progress: called with a dict (step, epoch, loss, lr, tokens_per_s, minutes) every `log_every` steps.
        overwrite: a new run may replace the run already in `out_dir` (what a run writes there is removed when
            training starts; other files are kept). A directory that holds anything but a run is never written.
        stop_when: called with the training position after each step; True ends training there, as the
            recipe's own limits do (e.g. a budget of pure training time: `position.step_seconds`).
    """

    def __init__(
        self,
        run: RunConfig,
        out_dir: str | Path,
        resume: bool = False,
        progress: Optional[Callable[[dict[str, Any]], None]] = None,
        overwrite: bool = False,
        stop_when: Optional[Callable[[Any], bool]] = None,
    ) -> None:
        self.out = Path(out_dir)
        self.progress, self.stop_when = progress, stop_when
        self.dist = Distributed(run.train.device)
        # checked first, before any corpus is prepared; by the main process, the one that writes the directory
        self.clear = not resume and self.dist.main and (self.out / rundir.CONFIG).exists()
        if not resume and self.dist.main:
            check_output_dir(self.out, "training run", rundir.not_a_run_dir, overwrite)
        self.device = self.dist.device
        self.precision = backend.resolve_precision(run.train.precision, self.device)
        if self.precision.bf16 and self.device.type == "cpu":
            memory.bound_onednn_cache()  # before the first oneDNN product of this process
        self.variant = run.variant_changes(self.precision.name)  # the recipe's settings for this precision
        run = run.for_precision(self.precision.name)
        if run.train.threads:
            torch.set_num_threads(run.train.threads)
        torch.manual_seed(run.train.seed)
        state = base = None
        if resume:
            try:
                state = read_training_state(self.out / "last")
            except CheckpointError as e:
                raise CheckpointError(f"{e}; cannot --resume {self.out}") from None
            if self.device.type == "cpu":  # the products sum in the order they did before the run stopped
                changed = paths.reapply_cpu_paths(state.meta.get("cpu_paths"))
                if changed and self.dist.main:
                    log.info("%s", changed)
        elif run.model.init_from:  # fine-tuning: the starting checkpoint's model and tokenizer
            base = load_checkpoint(run.model.init_from)
        tokenizers = state.checkpoint.tokenizers if state else base.tokenizers if base else None
        self.task = build_task(run, tokenizers)
        model_cfg = _model_config(run, self.task, base)
        if run.train.lora is not None:  # adapters are part of the model: checkpoints and --resume rebuild them
            model_cfg = dataclasses.replace(model_cfg, lora=run.train.lora)
        self.run = dataclasses.replace(run, model=model_cfg)
        self.model = build_model(self.run.model).to(self.device)
        head: frozenset[str] = frozenset()
        if state is not None:  # weights go in before any sharding
            load_weights(self.model, state.checkpoint.model.state_dict(), self.out / "last")
            head = _not_in_base(self.model, run.model.init_from)  # the new head keeps its own learning rate
        elif base is not None:
            head = frozenset(_start_from(self.model, base, run.model.init_from, self.dist.main))
        if run.train.lora is not None:  # the adapters train, and so do layers the base did not have (a new head)
            trained = trainable_parameters(self.model, run.train.lora, also=head)
            if self.dist.main:
                n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
                log.info("LoRA: %d tensors (%d parameters) train, the rest frozen", len(trained), n)
        self.fsdp = self.run.train.fsdp
        self.step_module = data_parallel(self.model, _LossStep(self.model, self.task), self.dist, self.fsdp)
        self.optimizer = adamw(self.model, self.run.train, fused=not self.fsdp, head=head)
        t = self.run.train
        per_epoch = math.ceil(self.task.num_batches(0) / (t.accumulate * self.dist.world))
        self.total_steps = t.max_steps or t.max_epochs * per_epoch or None  # where "linear"/"cosine" end
        self.saver = _Saver(self.out, self.run, self.task, self.dist, self.model, self.optimizer, self.fsdp)
        self.position = (
            Position()
            if state is None
            else _restore(state, self.model, self.optimizer, self.dist, self.run.train.seed, self.fsdp)
        )
        if state is not None:  # steps beyond last/ belong to the part of the run that was lost
            if self.dist.main:
                rundir.drop_later_steps(self.out, self.position.step)
        self.since_log = _Window(**self.position.windows.get("log", {}))
        self.since_eval = _Window(**self.position.windows.get("eval", {}))

    # -- the loop -------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Train until max_steps, max_epochs, max_minutes or stop_at; returns the last validation figures.

        SIGINT/SIGTERM at any point of it (the handlers are in place before anything is written) stop training
        at the next safe point, a resumable `last/` written: after the current step, or after the final
        validation or the averaging. A resumed run then does exactly what remains."""
        t = self.run.train
        with StopSignals() as signals:
            if self.dist.main:
                self._start_run_dir()
            start = time.perf_counter() - self.position.elapsed
            self._stop_if_signalled(signals.signum, start)
            while not self._done(start):
                step_start = time.perf_counter()
                figures = self._train_step()
                self.position.step_seconds += time.perf_counter() - step_start
                self.since_log.add(*figures)
                self.since_eval.add(*figures)
                if self.position.step % t.log_every == 0:
                    self._report(self.since_log, start)
                    self.since_log = _Window()
                if self.position.step % t.eval_every == 0:
                    self._validate(start, self.since_eval)
                self._stop_if_signalled(signals.signum, start)
            if (self.position.validated or {}).get("step") != self.position.step:
                self._validate(start, None)
                self._stop_if_signalled(signals.signum, start)
            if t.average_last and self.dist.main:
                averaged = rundir.average_last(self.out, t.average_last, self.position.step)
                log.info("averaged %s into %s", ", ".join(p.name for p in averaged), self.out / "averaged")
            self._stop_if_signalled(signals.signum, start, saved=True)
        return dict(self.position.validated or {})

    def _stop_if_signalled(self, signum: Optional[int], start: float, saved: bool = False) -> None:
        """After SIGINT/SIGTERM: save a resumable checkpoint (unless `saved`: the run is complete and `last/`
        holds it) and stop, every process at the same point."""
        if not self.dist.sum(float(signum is not None)):
            return
        if not saved:
            self.saver.last(self._position(), time.perf_counter() - start)
        signum = signum or signal.SIGTERM
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name}: training stopped at step {self.position.step}; "
            f"resume with --resume {self.out}",
            signum,
        )

    def _position(self) -> Position:
        """The position to save, with the figures summed since the last report and validation."""
        self.position.windows = {"log": self.since_log.saved(), "eval": self.since_eval.saved()}
        return self.position

    def _start_run_dir(self) -> None:
        if self.clear:  # a new run over an old one (`overwrite`): the old run's files go, nothing else
            rundir.clear_run(self.out)
            self.clear = False
        self.out.mkdir(parents=True, exist_ok=True)
        rundir.write_run_config(self.out, self.run, _cpu_paths(self.device))
        log.info(
            "model: %s parameters; task: %s; %d process(es)",
            f"{count_parameters(self.model):,}",
            self.task.name,
            self.dist.world,
        )
        log.info("padding fraction of training batches: %.3f", self.task.padding_fraction(self.position.epoch))
        log.info("%s", backend.describe(self.device, self.precision, self.variant))

    def _train_step(self) -> tuple[float, int, float]:
        """One optimizer step over this process's micro-batches. Returns the loss summed over the step's target
        tokens (all processes), their number, and the gradient norm before clipping."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro = self._step_batches()
        # Weight each micro-batch by its share of the target tokens of the whole (global) step; DDP's gradient
        # average over processes then gives exactly the single-process token-weighted mean.
        total = int(self.dist.sum(sum(b.n_tokens for b in micro)))
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            with self._no_sync(i < len(micro) - 1), backend.autocast(self.device, self.precision):
                loss = self.step_module(batch)
            (loss * (batch.n_tokens * self.dist.world / total)).backward()
            loss_sum += float(loss.detach()) * batch.n_tokens
        loss_sum = self.dist.sum(loss_sum)
        return loss_sum, total, self._update(loss_sum)

    def _step_batches(self) -> list:
        """This process's micro-batches for one optimizer step. A step consumes world x accumulate batches in
        order (crossing into the next epoch when one runs out); process r takes every world-th of them."""
        positions = []
        for _ in range(self.dist.world * self.run.train.accumulate):
            if self.position.batch >= self.task.num_batches(self.position.epoch):
                self.position.epoch += 1
                self.position.batch = 0
            positions.append((self.position.epoch, self.position.batch))
            self.position.batch += 1
        mine = positions[self.dist.rank :: self.dist.world]
        return [_to_device(self.task.batch(epoch, index), self.device) for epoch, index in mine]

    def _no_sync(self, skip: bool):
        """Inside gradient accumulation, no all-reduce until the last micro-batch of a step."""
        if skip and hasattr(self.step_module, "no_sync"):
            return self.step_module.no_sync()
        return contextlib.nullcontext()

    def _update(self, step_loss: float) -> float:
        """Clip, check and apply the gradients of one step; returns their norm before clipping."""
        t = self.run.train
        # The gradient norm (clipped to clip_norm, if set) doubles as the check for inf/NaN.
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm if t.clip_norm > 0 else math.inf)
        self.position.step += 1
        if math.isfinite(step_loss) and bool(torch.isfinite(norm)):
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(t, self.position.step, self.total_steps, group.get("peak"))
            self.optimizer.step()
            self.position.bad_steps = 0
        else:
            self._skip_bad_step(step_loss, float(norm))
        return float(norm)

    def _skip_bad_step(self, loss: float, norm: float) -> None:
        """A non-finite loss or gradient: no update this step; too many in a row ends training."""
        self.optimizer.zero_grad(set_to_none=True)
        self.position.bad_steps += 1
        limit = self.run.train.max_bad_steps
        log.warning(
            "step %d: non-finite loss (%s) or gradient norm (%s); step skipped (%d in a row, limit %d)",
            self.position.step,
            loss,
            norm,
            self.position.bad_steps,
            limit,
        )
        if self.position.bad_steps >= limit:
            raise TransformerError(
                f"training stopped at step {self.position.step}: {self.position.bad_steps} steps in a row had a "
                f"non-finite loss or gradient (try a lower train.lr or train.precision: fp32); the last good "
                f"checkpoint is {self.out / 'last'}"
            )

    def _done(self, start: float) -> bool:
        t, p = self.run.train, self.position
        if t.max_steps and p.step >= t.max_steps:
            return True
        # epochs completed: the current one counts once its last batch has been taken
        epochs = p.epoch + (p.batch >= self.task.num_batches(p.epoch))
        if t.max_epochs and epochs >= t.max_epochs:
            return True
        if t.max_minutes and time.perf_counter() - start >= t.max_minutes * 60:
            return True
        if self.stop_when is not None and self.stop_when(p):
            return True
        return self.position.reached_target

    def _report(self, window: _Window, start: float) -> None:
        if not self.dist.main or self.progress is None:
            return
        now = time.perf_counter()
        self.progress(
            dict(
                step=self.position.step,
                epoch=self.position.epoch,
                loss=window.loss / max(window.tokens, 1),
                lr=learning_rate(self.run.train, self.position.step, self.total_steps),
                tokens_per_s=window.tokens / max(now - window.start, 1e-9),
                minutes=(now - start) / 60,
            )
        )

    # -- validation and checkpoints -------------------------------------------------------------------------

    def translate(self, texts: Sequence[str], model: Optional[nn.Module] = None) -> list[str]:
        """Translate with the model being trained (as validation does): the run's precision and beam."""
        with backend.autocast(self.device, self.precision):
            return translate_texts(
                model or self.model,
                self.task.src_tok,
                self.task.tgt_tok,
                texts,
                DecodingSettings(beam_size=self.run.train.eval_beam),
            )

    def _validate(self, start: float, window: Optional[_Window]) -> dict[str, Any]:
        """Score the model, append the figures to metrics.jsonl and save the step and best checkpoints (the main
        process), then save `last/` (every process takes part in gathering a sharded model)."""
        model = self.saver.whole_model()
        record: dict[str, Any] = {"step": self.position.step}
        if model is not None:
            record = self._score(model, start, window)
            self.saver.validated(record, model, self._note_best(record))
        if window is not None:
            self.since_eval = _Window()  # before last/ is saved: a resumed run starts the next window afresh
        # the main process scored: every process learns whether stop_at was reached, and what was validated
        self.position.reached_target = self.dist.sum(float(self.position.reached_target)) > 0
        self.position.validated = record if self.dist.main else {"step": self.position.step}
        self.saver.last(self._position(), time.perf_counter() - start, model, gathered=True)  # records the best
        return record

    def _score(self, model: nn.Module, start: float, window: Optional[_Window]) -> dict[str, Any]:
        """The validation figures of `model`, with where training is and how it went since the last time."""
        with backend.autocast(self.device, self.precision):
            figures = self.task.validate(model, lambda texts: self.translate(texts, model))
        self.model.train()
        record = {
            "step": self.position.step,
            "epoch": self.position.epoch,
            "minutes": round((time.perf_counter() - start) / 60, 3),
            "train_minutes": round(self.position.step_seconds / 60, 3),
            "lr": learning_rate(self.run.train, max(self.position.step, 1), self.total_steps),
        }
        if window is not None:
            record["train_loss"] = round(window.loss / max(window.tokens, 1), 4)
            record["grad_norm"] = round(sum(window.norms) / len(window.norms), 4)  # before clipping, mean per step
        record.update({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})
        return record

    def _note_best(self, record: dict[str, Any]) -> bool:
        """Update the best score (and whether `stop_at` is reached) from `record`; True if it is a new best."""
        value = record.get(self.task.metric)
        if value is None or not math.isfinite(value):  # a NaN is never best, and would block every later best
            return False
        lower = self.task.metric == "val_loss"  # lower is better
        better = self.position.best is None or (value < self.position.best if lower else value > self.position.best)
        if better:
            self.position.best = value
        if self.run.train.stop_at is not None:
            stop = self.run.train.stop_at
            self.position.reached_target = value <= stop if lower else value >= stop
        return better


def _model_config(run: RunConfig, task, base) -> ModelConfig:
    """The model to build: the recipe's, sized to the tokenizers; when fine-tuning, the starting checkpoint's
    with the recipe's head (as many classes as the data has)."""
    if base is None:
        return sized_for(run.model, task.tokenizers)
    labels = {"num_labels": len(task.labels)} if hasattr(task, "labels") else {}
    return fine_tuned(base.config, run.model, **labels)


def _not_in_base(model: nn.Module, init_from: Optional[str]) -> frozenset[str]:
    """The model's parameters that the starting checkpoint's weights file has no tensor for (a new head): on
    resuming, they get the head's learning rate (and train beside a LoRA run's adapters) as they did from the
    start. Read from the file's header alone."""
    if not init_from:
        return frozenset()
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(init_from) / "model.safetensors"), "pt") as f:
            held = set(f.keys())
    except (OSError, SafetensorError) as e:
        log.warning("%s: unreadable (%s); every layer taken as the starting checkpoint's", init_from, e)
        return frozenset()
    names: dict[int, list[str]] = {}  # a tied parameter is held under any one of its names
    for name, p in model.state_dict(keep_vars=True).items():
        names.setdefault(id(p), []).append(name)
    first = {id(p): n for n, p in model.named_parameters()}
    return frozenset(
        first[i] for i, ns in names.items() if i in first and ".lora_" not in ns[0] and not held.intersection(ns)
    )


def _start_from(model: nn.Module, base, where: str, main: bool) -> list[str]:
    """Copy the starting checkpoint's weights into `model`; returns the names of the layers it did not provide."""
    missing, unused = load_matching(model, base.model.state_dict())
    missing = [n for n in missing if ".lora_A." not in n and ".lora_B." not in n]  # new adapters are expected
    if main:
        if missing:
            log.warning("not in %s, initialised afresh: %s", where, ", ".join(missing))
        if unused:
            log.warning("in %s but not used by this model: %s", where, ", ".join(unused))
    return missing


def _restore(state: TrainingState, model: nn.Module, optimizer, dist: Distributed, seed: int, fsdp: bool) -> Position:
    """Resume: the optimizer state and each process's random state; returns the position in training."""
    load_named_optimizer_state(model, optimizer, state.optimizer, fsdp)
    rank = dist.rank
    if f"torch.{rank}" in state.rng and state.meta.get("world", 1) == dist.world:
        torch.set_rng_state(state.rng[f"torch.{rank}"])
        if f"cuda.{rank}" in state.rng and dist.device.type == "cuda":  # dropout's random numbers on the GPU
            torch.cuda.set_rng_state(state.rng[f"cuda.{rank}"], dist.device)
    else:  # a different number of processes: reseed each rank from the step instead
        torch.manual_seed(seed + 1000 * state.meta["position"]["step"] + rank)
    return Position(**state.meta["position"])


class _Saver:
    """What the trainer writes to its run directory: from the main process the metrics and the step and best
    checkpoints; with every process taking part (a sharded model is gathered), `last/` and its training state.
    """

    def __init__(self, out: Path, run: RunConfig, task, dist: Distributed, model: nn.Module, optimizer, fsdp: bool):
        self.out, self.run, self.task, self.dist = out, run, task, dist
        self.model, self.optimizer, self.fsdp = model, optimizer, fsdp

    def whole_model(self) -> Optional[nn.Module]:
        """The whole model on the main process (None elsewhere): the model itself, or with FSDP an unsharded
        copy gathered from every process (a collective call)."""
        if not self.fsdp:
            return self.model if self.dist.main else None
        weights = full_state_dict(self.model, fsdp=True)
        if not self.dist.main:
            return None
        replica = build_model(self.run.model)
        load_weights(replica, weights, Path("<gathered>"))
        return replica.to(self.dist.device)

    def validated(self, record: dict[str, Any], model: nn.Module, better: bool) -> None:
        """After a validation (main process): its metrics line, its step checkpoint, and `best/` if better."""
        rundir.append_metrics(self.out, record)
        self._write(rundir.step_dir(self.out, record["step"]), model, record["step"])
        rundir.prune_step_checkpoints(self.out, self.run.train.keep_checkpoints)
        if better:
            self._write(self.out / "best", model, record["step"], extra={"validation": record})

    def last(
        self, position: Position, elapsed: float, model: Optional[nn.Module] = None, gathered: bool = False
    ) -> None:
        """The resumable checkpoint: weights, optimizer, every process's random states, the data position.
        Every process calls it. `gathered`: the caller has `whole_model()`'s result already (`model`, None on
        all but the main process), so it is not gathered again."""
        device = self.dist.device
        cpu_rngs = self.dist.gather(torch.get_rng_state())
        gpu_rngs = self.dist.gather(torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        optimizer = named_optimizer_state(self.model, self.optimizer, self.fsdp)
        if not gathered:
            model = self.whole_model()
        if model is not None:
            rng = {f"torch.{r}": s for r, s in enumerate(cpu_rngs)}
            rng.update({f"cuda.{r}": s for r, s in enumerate(gpu_rngs) if s is not None})
            meta = {
                "position": {**dataclasses.asdict(position), "elapsed": elapsed},
                "world": self.dist.world,
                "cpu_paths": _cpu_paths(device),
            }
            self._write(self.out / "last", model, position.step, training_state(optimizer, rng, meta))
        self.dist.barrier()

    def _write(self, directory: Path, model: nn.Module, step: int, state=None, extra: Optional[dict] = None) -> None:
        bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:  # never over a good checkpoint: last/ must stay "the last good checkpoint"
            raise TransformerError(
                f"training stopped at step {step}: parameter '{bad}' is no longer finite (inf/NaN), so nothing was "
                f"saved to {directory}; the last good checkpoint is {self.out / 'last'} (try a lower train.lr or "
                "train.precision: fp32)"
            )
        meta = {"step": step, "run": self.run.to_dict(), **getattr(self.task, "meta", {}), **(extra or {})}
        try:
            save_checkpoint(directory, model, self.task.name, self.task.tokenizers, meta, state, overwrite=True)
        except OSError as e:
            raise TransformerError(
                f"{directory}: could not save the checkpoint ({e.strerror or e}); the previous one is intact"
            ) from None


class StopSignals:
    """Within the block, SIGINT and SIGTERM only set `signum` (the trainer stops at the end of the step and
    saves a resumable checkpoint); the previous handlers come back after it."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        def handler(signum, frame):
            self.signum = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)


def _cpu_paths(device: torch.device) -> Optional[dict]:
    """The CPU fast paths training runs on, to save with the run (None on a GPU, where there are none)."""
    return paths.cpu_paths().to_dict() if device.type == "cpu" else None


def _to_device(batch, device: torch.device):
    return batch if device.type == "cpu" else batch.to(device)
