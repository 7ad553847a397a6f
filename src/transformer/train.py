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

from . import backend
from .checkpoint import STATE_JSON, STATE_TENSORS, load_weights, save_checkpoint, write_json_atomic
from .config import RunConfig, TrainConfig, from_dict
from .distributed import Distributed
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


class _LossStep(nn.Module):
    """model + task.loss as one module, so DistributedDataParallel's forward sees the whole computation."""

    def __init__(self, model: nn.Module, task) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch):
        return self.task.loss(self.model, batch)[0]


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
        self.dist = Distributed(t.device)
        self.device = self.dist.device
        self.precision = backend.resolve_precision(t.precision, self.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        tokenizers = None
        state = None
        if resume:
            state, tokenizers = self._read_resume_state()
        self.task = build_task(run, tokenizers)
        self.model = self._build_model().to(self.device)
        if state is not None:  # weights go in before any sharding
            load_weights(self.model, state[0], self.out / "last")
        self.fsdp = t.fsdp
        self.step_module: nn.Module = _LossStep(self.model, self.task)
        if t.fsdp:
            self._shard()
        elif self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DistributedDataParallel(self.step_module, device_ids=ids)
        # Weight decay on matrices (projections, embeddings) only, never on biases and LayerNorm gains.
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # The fused kernel updates each tensor in one pass (3x faster than the default on a 2-core CPU at 44M
        # parameters); FSDP's sharded parameters keep the default implementation.
        fused = not t.fsdp and self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=fused or None)
        self.pos = Position()
        if state is not None:
            self._restore(state[1], state[2])
        self._stop_signal: Optional[int] = None
        self.bad_steps = 0
        self.reached_target = False  # the validation metric reached train.stop_at

    # -- set-up ---------------------------------------------------------------------------------------------

    def describe_machine(self) -> str:
        """One line: the device, the precision and why, and (on CPU) the fast paths this machine gets."""
        if self.device.type == "cuda":
            where = f"device: {self.device} ({torch.cuda.get_device_name(self.device)})"
        else:
            where = f"device: cpu ({backend.cpu_description()}, {torch.get_num_threads()} threads); " \
                    f"{backend.cpu_paths().describe()}"
        return f"{where}; precision: {self.precision.name} ({self.precision.reason})"

    def _build_model(self) -> nn.Module:
        cfg = self.run.model
        toks = self.task.tokenizers
        cfg.tgt_vocab_size = toks["tgt"].vocab_size
        if "src" in toks:
            cfg.src_vocab_size = toks["src"].vocab_size
        cfg.__post_init__()  # re-check with the real vocabulary sizes
        return build_model(cfg)

    def _shard(self) -> None:
        """FSDP2: shard each layer's parameters (and the rest at the root) across the processes."""
        try:
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        except ImportError:
            raise TransformerError(
                f"--fsdp needs FSDP2's fully_shard (torch >= 2.6); the installed torch is {torch.__version__}"
            ) from None
        if self.dist.world < 2:
            raise TransformerError("--fsdp shards parameters across processes: launch with torchrun --nproc-per-node N")
        for module in self.model.modules():
            if type(module).__name__ == "TransformerLayer":
                fully_shard(module)
        fully_shard(self.model)
        register_fsdp_forward_method(self.model, "loss")  # the trainer calls model.loss, not model(...)

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

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self._load_optimizer(_unflatten_optimizer(tensors, state["optimizer"]))
        rng = tensors.get(f"rng.torch.{self.dist.rank}")
        if rng is not None and state.get("world", 1) == self.dist.world:
            torch.set_rng_state(rng)
            cuda_rng = tensors.get(f"rng.cuda.{self.dist.rank}")
            if cuda_rng is not None and self.device.type == "cuda":  # dropout's random numbers on the GPU
                torch.cuda.set_rng_state(cuda_rng, self.device)
        else:  # a different number of processes: reseed each rank from the step instead
            torch.manual_seed(self.run.train.seed + 1000 * state["position"]["step"] + self.dist.rank)
        p = state["position"]
        self.pos = Position(p["step"], p["epoch"], p["batch"], p["elapsed"], p.get("best"))

    # Optimizer state is stored keyed by parameter name, so it loads whatever the process count or sharding.

    def _optimizer_state(self) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        sd = self.optimizer.state_dict()
        names = self._optimizer_param_names()
        return {
            "state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
        }

    def _load_optimizer(self, named: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, named, options=StateDictOptions(full_state_dict=True))
            return
        index = {n: i for i, n in enumerate(self._optimizer_param_names())}
        self.optimizer.load_state_dict({
            "state": {index[n]: v for n, v in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]],
        })

    def _optimizer_param_names(self) -> list[str]:
        """Parameter names in the optimizer's own numbering (group by group)."""
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def _full_model(self) -> Optional[nn.Module]:
        """The whole model on the main process (None elsewhere): the model itself, or with FSDP an unsharded
        copy gathered from every process (a collective call)."""
        if not self.fsdp:
            return self.model if self.dist.main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.main:
            return None
        replica = build_model(self.run.model)
        load_weights(replica, full, Path("<gathered>"))
        return replica.to(self.device)

    # -- the loop -------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Train until max_steps, max_epochs or max_minutes; returns the last validation figures."""
        t = self.run.train
        main = self.dist.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "run_config.json", self.run.to_dict())
            log.info("model: %s parameters; task: %s; %d process(es)", f"{count_parameters(self.model):,}",
                     self.task.name, self.dist.world)
            log.info("padding fraction of training batches: %.3f", self.task.padding_fraction(self.pos.epoch))
            log.info("%s", self.describe_machine())
        autocast = backend.autocast(self.device, self.precision)
        start = time.perf_counter() - self.pos.elapsed
        last_eval: dict[str, Any] = {}
        window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        eval_loss, eval_tokens, eval_norms = 0.0, 0, []  # training loss and gradient norms since the last validation
        old_handlers = self._catch_signals()
        try:
            while not self._done(start):
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                micro = self._step_batches()
                # Weight each micro-batch by its share of the target tokens of the whole (global) step; DDP's
                # gradient average over processes then gives exactly the single-process token-weighted mean.
                local_tokens = sum(n for _, n in micro)
                total_tokens = self.dist.sum(local_tokens)
                step_loss = 0.0
                for i, (batch, n) in enumerate(micro):
                    last = i == len(micro) - 1
                    with self._no_sync(not last), autocast:
                        loss = self.step_module(batch)
                    (loss * (n * self.dist.world / total_tokens)).backward()
                    step_loss += float(loss.detach()) * n
                step_loss = self.dist.sum(step_loss)
                eval_norms.append(self._update(step_loss, total_tokens))
                window_loss += step_loss
                eval_loss += step_loss
                eval_tokens += total_tokens
                window_tokens += total_tokens
                if main and self.pos.step % t.log_every == 0 and self.progress is not None:
                    now = time.perf_counter()
                    self.progress(
                        dict(step=self.pos.step, epoch=self.pos.epoch, loss=window_loss / max(window_tokens, 1),
                             lr=learning_rate(t, self.pos.step), tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                             minutes=(now - start) / 60)
                    )
                    window_loss, window_tokens, window_start = 0.0, 0, now
                if self.pos.step % t.eval_every == 0:
                    last_eval = self._validate(start, eval_loss / max(eval_tokens, 1), sum(eval_norms) / len(eval_norms))
                    eval_loss, eval_tokens, eval_norms = 0.0, 0, []
                    self.reached_target = self.dist.sum(float(self.reached_target)) > 0  # rank 0 scored
                stop = self.dist.sum(float(self._stop_signal is not None))  # every process stops at the same step
                if stop:
                    self._save_last(start)
                    signum = self._stop_signal or signal.SIGTERM
                    raise TrainingInterrupted(
                        f"{signal.Signals(signum).name}: training stopped at step {self.pos.step}; "
                        f"resume with --resume {self.out}",
                        signum,
                    )
            if not last_eval or last_eval.get("step") != self.pos.step:
                last_eval = self._validate(start, None, None)
            if t.average_last and self.dist.main:
                steps = sorted((self.out / "checkpoints").glob("step-*"))[-t.average_last :]
                average_checkpoints(steps, self.out / "averaged")
                log.info("averaged %d checkpoints (%s .. %s) into %s", len(steps), steps[0].name, steps[-1].name,
                         self.out / "averaged")
            return last_eval
        finally:
            self._restore_signals(old_handlers)

    def _no_sync(self, skip: bool):
        """Inside gradient accumulation, no all-reduce until the last micro-batch of a step."""
        import contextlib

        if skip and hasattr(self.step_module, "no_sync"):
            return self.step_module.no_sync()
        return contextlib.nullcontext()

    def _update(self, step_loss: float, total_tokens: float) -> float:
        """Clip, check and apply the gradients of one step; returns their norm before clipping."""
        t = self.run.train
        # The gradient norm (clipped to clip_norm, if set) doubles as the check for inf/NaN.
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm if t.clip_norm > 0 else math.inf)
        self.pos.step += 1
        if math.isfinite(step_loss) and bool(torch.isfinite(norm)):
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(t, self.pos.step)
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self._skip_bad_step(step_loss, float(norm))
        return float(norm)

    def _skip_bad_step(self, loss: float, norm: float) -> None:
        """A non-finite loss or gradient: no update this step; too many in a row ends training."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        limit = self.run.train.max_bad_steps
        log.warning("step %d: non-finite loss (%s) or gradient norm (%s); step skipped (%d in a row, limit %d)",
                    self.pos.step, loss, norm, self.bad_steps, limit)
        if self.bad_steps >= limit:
            raise TransformerError(
                f"training stopped at step {self.pos.step}: {self.bad_steps} steps in a row had a non-finite loss or "
                f"gradient (try a lower train.lr or train.precision: fp32); the last good checkpoint is {self.out / 'last'}"
            )

    def _done(self, start: float) -> bool:
        t = self.run.train
        if t.max_steps and self.pos.step >= t.max_steps:
            return True
        if t.max_epochs and self.pos.epoch >= t.max_epochs:
            return True
        if t.max_minutes and time.perf_counter() - start >= t.max_minutes * 60:
            return True
        return self.reached_target

    def _step_batches(self) -> list[tuple[Any, int]]:
        """This process's micro-batches for one optimizer step. A step consumes world x accumulate batches in
        order (crossing into the next epoch when one runs out); process r takes every world-th of them."""
        t = self.run.train
        positions = []
        for _ in range(self.dist.world * t.accumulate):
            if self.pos.batch >= self.task.num_batches(self.pos.epoch):
                self.pos.epoch += 1
                self.pos.batch = 0
            positions.append((self.pos.epoch, self.pos.batch))
            self.pos.batch += 1
        out = []
        for epoch, index in positions[self.dist.rank :: self.dist.world]:
            batch = _to_device(self.task.batch(epoch, index), self.device)
            n = batch.n_tokens if hasattr(batch, "n_tokens") else batch[1].numel()
            out.append((batch, n))
        return out

    # -- validation and checkpoints -------------------------------------------------------------------------

    def translate(self, texts: Sequence[str], model: Optional[nn.Module] = None) -> list[str]:
        t = self.run.train
        with backend.autocast(self.device, self.precision):
            return translate_texts(model or self.model, self.task.src_tok, self.task.tgt_tok, texts,
                                   beam_size=t.eval_beam)

    def _validate(self, start: float, train_loss: Optional[float], grad_norm: Optional[float]) -> dict[str, Any]:
        """Validate, append to metrics.jsonl and save checkpoints (the main process), then save `last/` (all
        processes take part in gathering). With FSDP the whole model is gathered once for both."""
        model = self._full_model()
        record = self._score(model, start, train_loss, grad_norm) if model is not None else {"step": self.pos.step}
        self._save_last(start, model, gathered=True)  # after scoring, so it records the updated best
        return record

    def _score(self, model: nn.Module, start: float, train_loss: Optional[float], grad_norm: Optional[float]) -> dict[str, Any]:
        with backend.autocast(self.device, self.precision):
            figures = self.task.validate(model, lambda texts: self.translate(texts, model))
        lr = learning_rate(self.run.train, max(self.pos.step, 1))
        record = {"step": self.pos.step, "epoch": self.pos.epoch, "minutes": round((time.perf_counter() - start) / 60, 3),
                  "lr": lr}
        if train_loss is not None:
            record["train_loss"] = round(train_loss, 4)
            record["grad_norm"] = round(grad_norm, 4)  # before clipping, mean over the steps since the last one
        record.update({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})
        metric = self.task.metric
        value = record.get(metric)
        better = value is not None and (
            self.pos.best is None or (value < self.pos.best if metric == "val_loss" else value > self.pos.best)
        )
        if better:
            self.pos.best = value
        target = self.run.train.stop_at
        if value is not None and target is not None:
            self.reached_target = value <= target if metric == "val_loss" else value >= target
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step_dir = self.out / "checkpoints" / f"step-{self.pos.step:07d}"
        self._write(step_dir, model)
        self._prune_step_checkpoints()
        if better:
            self._write(self.out / "best", model, extra={"validation": record})
        self.model.train()
        return record

    def _write(self, directory: Path, model: nn.Module, state=None, extra: Optional[dict] = None) -> None:
        meta = {"step": self.pos.step, "run": self.run.to_dict(), **(extra or {})}
        try:
            save_checkpoint(directory, model, self.task.name, self.task.tokenizers, meta, state)
        except OSError as e:
            raise TransformerError(
                f"{directory}: could not save the checkpoint ({e.strerror or e}); the previous one is intact"
            ) from None

    def _save_last(self, start: float, model: Optional[nn.Module] = None, gathered: bool = False) -> None:
        """The resumable checkpoint: weights, optimizer, every process's RNG, the data position. Every process
        calls it (gathering is collective); the main process writes. `gathered`: `model` is already the
        result of `_full_model()`."""
        rngs = self.dist.gather(torch.get_rng_state())
        cuda_rngs = self.dist.gather(torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        optimizer = self._optimizer_state()
        if not gathered:
            model = self._full_model()
        if model is not None:
            tensors, opt_meta = _flatten_optimizer(optimizer)
            tensors.update({f"rng.torch.{r}": rng for r, rng in enumerate(rngs)})
            tensors.update({f"rng.cuda.{r}": rng for r, rng in enumerate(cuda_rngs) if rng is not None})
            position = {"step": self.pos.step, "epoch": self.pos.epoch, "batch": self.pos.batch,
                        "elapsed": time.perf_counter() - start, "best": self.pos.best}
            state = (tensors, {"optimizer": opt_meta, "position": position, "world": self.dist.world})
            self._write(self.out / "last", model, state)
        self.dist.barrier()

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


def _to_device(batch, device: torch.device):
    if device.type == "cpu":
        return batch
    return batch.to(device) if hasattr(batch, "to") else tuple(t.to(device) for t in batch)


# ----------------------------------------------------------------------------------------------------------
# Optimizer state <-> (tensors for safetensors, JSON for the rest)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a name-keyed optimizer state into tensors (for safetensors) and everything else (for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict] = {}
    for name, s in state["state"].items():
        entry = {}
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{name}.{k}"] = v.detach().cpu()
                entry[k] = "tensor"
            else:
                entry[k] = v
        per_param[name] = entry
    return tensors, {"state": per_param, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for name, entry in meta["state"].items():
        state[name] = {k: tensors[f"optimizer.{name}.{k}"] if v == "tensor" else v for k, v in entry.items()}
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
