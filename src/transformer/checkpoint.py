"""The checkpoint directory: saved atomically, loaded safely (JSON + safetensors only, nothing unpickled).

    CHECKPOINT/
      config.json          format version, task, model config, tokenizer file names, anything else (`meta`)
      model.safetensors    the weights (tied weights stored once)
      *tokenizer.json      the vocabulary the task needs
      training_state.*     optimizer, schedule, RNG and data position: only where training can resume
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .config import ModelConfig, from_dict
from .data import Tokenizer, load_tokenizer
from .errors import CheckpointError, ConfigError, TransformerError
from .files import fsync_dir, read_json, write_json_atomic
from .model import build_model

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


@dataclass
class Checkpoint:
    model: nn.Module
    config: ModelConfig
    task: str
    tokenizers: dict[str, Tokenizer]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def src_tokenizer(self) -> Tokenizer:
        return self.tokenizers["src"]

    @property
    def tgt_tokenizer(self) -> Tokenizer:
        return self.tokenizers["tgt"]


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    task: str,
    tokenizers: dict[str, Tokenizer],
    meta: Optional[dict[str, Any]] = None,
    training_state: Optional[tuple[dict[str, torch.Tensor], dict[str, Any]]] = None,
) -> Path:
    """Write a complete checkpoint directory, atomically: everything goes into a temporary sibling directory
    that replaces `directory` only once it is complete, so a crash never leaves a half-written checkpoint.
    `tokenizers` maps a role ("src", "tgt") to a tokenizer; a tokenizer shared by two roles is stored once."""
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover(directory, clean=True)
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        files: dict[str, str] = {}
        for role, tok in tokenizers.items():
            shared = sum(t is tok for t in tokenizers.values()) > 1
            files[role] = "tokenizer.json" if shared else f"{role}_tokenizer.json"
            if not (tmp / files[role]).exists():
                tok.save(tmp / files[role])
        save_model(model, str(tmp / WEIGHTS), metadata={"format_version": str(FORMAT_VERSION)})
        if training_state is not None:
            tensors, state = training_state
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
            write_json_atomic(tmp / STATE_JSON, state)
        config = {
            "format_version": FORMAT_VERSION,
            "task": task,
            "model": model.config.to_dict(),
            "tokenizers": files,
            "weights_sha256": file_sha256(tmp / WEIGHTS),  # checked on load: a changed weights file is refused
            "meta": meta or {},
        }
        write_json_atomic(tmp / CONFIG, config)
        fsync_dir(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(directory, old)
        os.replace(tmp, directory)
        fsync_dir(directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def recover(directory: Path, clean: bool = False) -> None:
    """Finish an interrupted replacement. Saving moves the old checkpoint aside to `.NAME.*.old` and then
    renames the complete new one into place; a process killed between those two renames leaves no NAME, so
    the old checkpoint is put back. `clean` (the writer's call) also removes leftovers of killed saves."""
    directory = Path(directory)
    parent = directory.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{directory.name}.*.old"), key=lambda p: p.stat().st_mtime)
    if not directory.exists() and olds:
        os.replace(olds.pop(), directory)
    if clean:
        for leftover in [*olds, *parent.glob(f".{directory.name}.*.tmp")]:
            shutil.rmtree(leftover, ignore_errors=True)


def read_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.exists():
        recover(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (expected a directory with {CONFIG})")
    path = directory / CONFIG
    config = read_json(path, CheckpointError, f"missing; {directory} is not a checkpoint directory")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported (this package reads version {FORMAT_VERSION})"
        )
    for key in ("task", "model", "tokenizers"):
        if key not in config:
            raise CheckpointError(f"{path}: missing key '{key}'")
    return config


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu", task: Optional[str] = None) -> Checkpoint:
    """Load a checkpoint directory. Raises CheckpointError naming the file (and tensor) for anything missing,
    corrupt or of the wrong shape; `task` checks that the checkpoint is of the expected kind."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    if task is not None and config["task"] not in _compatible(task):
        raise CheckpointError(f"{directory}: is a '{config['task']}' checkpoint, but this command needs a '{task}' one")
    try:
        model_cfg = from_dict(ModelConfig, config["model"], prefix="model.")
    except ConfigError as e:
        raise CheckpointError(f"{directory / CONFIG}: {e}") from None
    model = build_model(model_cfg)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing weights file")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: corrupt or truncated weights file ({e})") from None
    expected = config.get("weights_sha256")  # absent in checkpoints written before it was recorded
    if expected is not None and file_sha256(weights) != expected:
        raise CheckpointError(f"{weights}: the file differs from the one saved with this checkpoint (its SHA-256 "
                              f"does not match {CONFIG}); it was changed or damaged after saving")
    load_weights(model, state, weights)
    model.to(device).eval()
    files = {name: load_tokenizer(directory / name) for name in set(config["tokenizers"].values())}
    tokenizers = {role: files[name] for role, name in config["tokenizers"].items()}  # a joint one: one object
    return Checkpoint(model, model_cfg, config["task"], tokenizers, config.get("meta", {}), directory)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _compatible(task: str) -> tuple[str, ...]:
    # the built-in synthetic task is a translation task on made-up data; a classifier also embeds sentences
    return {"translation": ("translation", "synthetic"), "embedding": ("embedding", "classification")}.get(task, (task,))


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `state` into `model`, checking every tensor's presence and shape. Tied weights may be stored under
    any one of their names."""
    params = dict(model.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}
    for name, p in params.items():
        groups.setdefault(id(p), []).append(name)
    unexpected = set(state) - set(params)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor '{sorted(unexpected)[0]}' (a different model?)")
    with torch.no_grad():
        for names in groups.values():
            found = [n for n in names if n in state]
            if not found:
                raise CheckpointError(f"{source}: missing tensor '{names[0]}'")
            tensor, target = state[found[0]], params[names[0]]
            if tensor.shape != target.shape:
                raise CheckpointError(
                    f"{source}: tensor '{found[0]}' has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(tensor)


def average_checkpoints(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Average the weights of several checkpoints of one model into a new checkpoint directory `out` (the
    first one's tokenizers and metadata, plus `averaged_from`)."""
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


# ----------------------------------------------------------------------------------------------------------
# Training state: what `last/` holds beyond the model, so that a run resumes exactly


@dataclass
class TrainingState:
    """A resumable checkpoint as read back: the checkpoint, the optimizer state keyed by parameter name, the
    random states per process, and the JSON part (position in training, process count)."""

    checkpoint: Checkpoint
    optimizer: dict
    rng: dict[str, torch.Tensor]  # "torch.R" / "cuda.R": the CPU / GPU random state of process R
    meta: dict[str, Any]


def training_state(optimizer: dict, rng: dict[str, torch.Tensor], meta: dict[str, Any]):
    """The `training_state` argument of `save_checkpoint`: optimizer state (keyed by parameter name) and
    random states as tensors for safetensors, everything else as JSON."""
    tensors: dict[str, torch.Tensor] = {f"rng.{k}": v for k, v in rng.items()}
    per_param: dict[str, dict] = {}
    for name, s in optimizer["state"].items():
        per_param[name] = {}
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{name}.{k}"] = v.detach().cpu()
                per_param[name][k] = "tensor"
            else:
                per_param[name][k] = v
    return tensors, {**meta, "optimizer": {"state": per_param, "param_groups": optimizer["param_groups"]}}


def read_training_state(directory: str | Path) -> TrainingState:
    """Read a resumable checkpoint (a run's `last/`)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / STATE_JSON).is_file():
        raise CheckpointError(f"{directory}: no resumable checkpoint (missing {STATE_JSON})")
    ckpt = load_checkpoint(directory)
    tensors = load_file(str(directory / STATE_TENSORS))
    meta = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    opt = meta.pop("optimizer")
    state = {name: {k: tensors[f"optimizer.{name}.{k}"] if v == "tensor" else v for k, v in entry.items()}
             for name, entry in opt["state"].items()}
    for g in opt["param_groups"]:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return TrainingState(ckpt, {"state": state, "param_groups": opt["param_groups"]}, rng, meta)
