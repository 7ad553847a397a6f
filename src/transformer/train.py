"""One training loop for every task: schedule, bf16 autocast, accumulation, validation, checkpoints, resume.

    RUN_DIR/
      run_config.json        the resolved recipe
      metrics.jsonl          one JSON line per validation
      last/                  newest checkpoint, with training_state (what `--resume RUN_DIR` reads)
      best/                  best validation checkpoint so far
      checkpoints/step-N/    the last `keep_checkpoints` checkpoints' weights (for `transformer average`)

Resuming restores the model, optimizer, step, data position (epoch, batch) and RNG, so N steps + M resumed
steps give the same parameters as N + M steps in one go. Batches are a pure function of (seed, epoch, index).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .checkpoint import STATE_JSON, STATE_TENSORS, load_weights, save_checkpoint, write_json_atomic
from .config import RunConfig, TrainConfig, from_dict
from .errors import CheckpointError, TransformerError
from .generate import translate_texts
from .model import build_model, count_parameters
from .tasks import build_task

log = logging.getLogger("transformer")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup to `lr`, then the schedule's decay."""
    warm = max(cfg.warmup_steps, 1)
    if step < warm:
        return cfg.lr * step / warm
    if cfg.schedule == "inverse_sqrt":  # the paper: d^-0.5 * min(step^-0.5, step * warmup^-1.5), peak = lr
        return cfg.lr * math.sqrt(warm / step)
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warm) / max(1, cfg.max_steps - warm))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    return cfg.lr


class TrainingInterrupted(TransformerError):
    """Training stopped by SIGINT/SIGTERM after saving a resumable checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    elapsed: float = 0.0  # seconds of training before this process
    best: Optional[float] = None


class Trainer:
    """Trains a model described by a `RunConfig` into a run directory.

    `progress`: a callable(dict) called every `log_every` steps (the CLI draws its progress bar with it).
    """

    def __init__(
        self,
        run: RunConfig,
        out_dir: str | Path,
        resume: bool = False,
        progress: Optional[Callable[[dict[str, Any]], None]] = None,
    ) -> None:
        self.run, self.out = run, Path(out_dir)
        self.progress = progress
        t = run.train
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        tokenizers = None
        state = None
        if resume:
            state, tokenizers = self._read_resume_state()
        self.task = build_task(run, tokenizers)
        self.model = self._build_model()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay
        )
        self.pos = Position()
        if state is not None:
            self._restore(*state)
        self._stop_signal: Optional[int] = None

    # -- set-up ---------------------------------------------------------------------------------------------

    def _build_model(self) -> nn.Module:
        cfg = self.run.model
        toks = self.task.tokenizers
        cfg.tgt_vocab_size = toks["tgt"].vocab_size
        if "src" in toks:
            cfg.src_vocab_size = toks["src"].vocab_size
        cfg.__post_init__()  # re-check with the real vocabulary sizes
        return build_model(cfg)

    def _read_resume_state(self):
        from safetensors.torch import load_file

        from .checkpoint import load_checkpoint

        last = self.out / "last"
        if not (last / STATE_JSON).is_file():
            raise CheckpointError(f"{last}: no resumable checkpoint (missing {STATE_JSON}); cannot --resume {self.out}")
        ckpt = load_checkpoint(last)
        tensors = load_file(str(last / STATE_TENSORS))
        state = json.loads((last / STATE_JSON).read_text())
        return (ckpt.model.state_dict(), tensors, state), ckpt.tokenizers

    def _restore(self, weights: dict, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        load_weights(self.model, weights, self.out / "last")
        opt_state = _unflatten_optimizer(tensors, state["optimizer"])
        self.optimizer.load_state_dict(opt_state)
        torch.set_rng_state(tensors["rng.torch"])
        p = state["position"]
        self.pos = Position(p["step"], p["epoch"], p["batch"], p["elapsed"], p.get("best"))

    # -- the loop -------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Train until max_steps, max_epochs or max_minutes; returns the last validation figures."""
        t = self.run.train
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "run_config.json", self.run.to_dict())
        model, task, opt = self.model, self.task, self.optimizer
        log.info("model: %s parameters; task: %s", f"{count_parameters(model):,}", task.name)
        log.info("padding fraction of training batches: %.3f", task.padding_fraction(self.pos.epoch))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.bf16)
        start = time.perf_counter() - self.pos.elapsed
        last_eval: dict[str, Any] = {}
        window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        old_handlers = self._catch_signals()
        try:
            while not self._done(start):
                model.train()
                opt.zero_grad(set_to_none=True)
                micro = []
                for _ in range(t.accumulate):
                    micro.append(self._next_batch())
                total_tokens = sum(n for _, n in micro)
                step_loss = 0.0
                for batch, n in micro:
                    with autocast:
                        loss, _ = task.loss(model, batch)
                    (loss * (n / total_tokens)).backward()
                    step_loss += float(loss.detach()) * n
                if t.clip_norm > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
                self.pos.step += 1
                lr = learning_rate(t, self.pos.step)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
                window_loss += step_loss
                window_tokens += total_tokens
                if self.pos.step % t.log_every == 0 and self.progress is not None:
                    now = time.perf_counter()
                    self.progress(
                        dict(step=self.pos.step, epoch=self.pos.epoch, loss=window_loss / max(window_tokens, 1),
                             lr=lr, tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                             minutes=(now - start) / 60)
                    )
                    window_loss, window_tokens, window_start = 0.0, 0, now
                if self.pos.step % t.eval_every == 0:
                    last_eval = self._validate(start, step_loss / max(total_tokens, 1), lr)
                if self._stop_signal is not None:
                    self._save_last(start)
                    name = signal.Signals(self._stop_signal).name
                    raise TrainingInterrupted(
                        f"{name}: training stopped at step {self.pos.step}; resume with --resume {self.out}",
                        self._stop_signal,
                    )
            if not last_eval or last_eval.get("step") != self.pos.step:
                last_eval = self._validate(start, None, learning_rate(t, max(self.pos.step, 1)))
            return last_eval
        finally:
            self._restore_signals(old_handlers)

    def _done(self, start: float) -> bool:
        t = self.run.train
        if t.max_steps and self.pos.step >= t.max_steps:
            return True
        if t.max_epochs and self.pos.epoch >= t.max_epochs:
            return True
        if t.max_minutes and time.perf_counter() - start >= t.max_minutes * 60:
            return True
        return False

    def _next_batch(self):
        if self.pos.batch >= self.task.num_batches(self.pos.epoch):
            self.pos.epoch += 1
            self.pos.batch = 0
        batch = self.task.batch(self.pos.epoch, self.pos.batch)
        self.pos.batch += 1
        n = batch.n_tokens if hasattr(batch, "n_tokens") else batch[1].numel()
        return batch, n

    # -- validation and checkpoints -------------------------------------------------------------------------

    def translate(self, texts: Sequence[str]) -> list[str]:
        t = self.run.train
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.bf16):
            return translate_texts(self.model, self.task.src_tok, self.task.tgt_tok, texts, beam_size=t.eval_beam)

    def _validate(self, start: float, train_loss: Optional[float], lr: float) -> dict[str, Any]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.run.train.bf16):
            figures = self.task.validate(self.model, self.translate)
        record = {"step": self.pos.step, "epoch": self.pos.epoch, "minutes": round((time.perf_counter() - start) / 60, 3),
                  "lr": lr}
        if train_loss is not None:
            record["train_loss"] = round(train_loss, 4)
        record.update({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})
        metric = self.task.metric
        value = record.get(metric)
        better = value is not None and (
            self.pos.best is None or (value < self.pos.best if metric == "val_loss" else value > self.pos.best)
        )
        if better:
            self.pos.best = value
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._save_last(start)
        step_dir = self.out / "checkpoints" / f"step-{self.pos.step:07d}"
        self._save(step_dir, with_state=False)
        self._prune_step_checkpoints()
        if better:
            self._save(self.out / "best", with_state=False, extra={"validation": record})
        self.model.train()
        return record

    def _save(self, directory: Path, with_state: bool, start: Optional[float] = None, extra: Optional[dict] = None) -> None:
        meta = {"step": self.pos.step, "run": self.run.to_dict(), **(extra or {})}
        state = None
        if with_state:
            elapsed = time.perf_counter() - start if start is not None else self.pos.elapsed
            tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
            tensors["rng.torch"] = torch.get_rng_state()
            position = {"step": self.pos.step, "epoch": self.pos.epoch, "batch": self.pos.batch,
                        "elapsed": elapsed, "best": self.pos.best}
            state = (tensors, {"optimizer": opt_meta, "position": position})
        save_checkpoint(directory, self.model, self.task.name, self.task.tokenizers, meta, state)

    def _save_last(self, start: float) -> None:
        self._save(self.out / "last", with_state=True, start=start)

    def _prune_step_checkpoints(self) -> None:
        steps = sorted((self.out / "checkpoints").glob("step-*"))
        for old in steps[: -self.run.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    # -- signals --------------------------------------------------------------------------------------------

    def _catch_signals(self):
        def handler(signum, frame):
            self._stop_signal = signum

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    @staticmethod
    def _restore_signals(old) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)


# ----------------------------------------------------------------------------------------------------------
# Optimizer state <-> (tensors for safetensors, JSON for the rest)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict] = {}
    for pid, s in state["state"].items():
        entry = {}
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{pid}.{k}"] = v
                entry[k] = "tensor"
            else:
                entry[k] = v
        per_param[str(pid)] = entry
    return tensors, {"state": per_param, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: tensors[f"optimizer.{pid}.{k}"] if v == "tensor" else v for k, v in entry.items()}
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def load_run_dir_config(run_dir: str | Path) -> RunConfig:
    """The recipe a run directory was trained with (for --resume)."""
    path = Path(run_dir) / "run_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {run_dir} is not a run directory") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    return from_dict(RunConfig, data)


def average_checkpoints(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Average the weights of several checkpoints of one model into a new checkpoint directory."""
    from .checkpoint import load_checkpoint

    if not paths:
        raise TransformerError("no checkpoints to average")
    ckpts = [load_checkpoint(p) for p in paths]
    first = ckpts[0]
    avg = {k: v.detach().clone().double() for k, v in first.model.state_dict().items()}
    for c in ckpts[1:]:
        if c.config != first.config:
            raise CheckpointError(f"{c.path}: a different model configuration from {first.path}; cannot average")
        for k, v in c.model.state_dict().items():
            avg[k] += v.double()
    with torch.no_grad():
        for k, v in first.model.state_dict().items():
            v.copy_((avg[k] / len(ckpts)).to(v.dtype))
    meta = dict(first.meta)
    meta["averaged_from"] = [str(p) for p in paths]
    return save_checkpoint(out, first.model, first.task, first.tokenizers, meta)
