"""The checkpoint directory: saved atomically, loaded safely (JSON + safetensors only, nothing unpickled).

    CHECKPOINT/
      config.json          format version, task, model config, tokenizer file names, anything else (`meta`)
      model.safetensors    the weights (tied weights stored once)
      *tokenizer.json      the vocabulary the task needs
      training_state.*     optimizer, schedule, RNG and data position: only where training can resume
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .config import ModelConfig, from_dict
from .data import Tokenizer, load_tokenizer
from .errors import CheckpointError, ConfigError
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


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            "meta": meta or {},
        }
        write_json_atomic(tmp / CONFIG, config)
        _fsync_dir(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.exists():
        recover(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (expected a directory with {CONFIG})")
    path = directory / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {directory} is not a checkpoint directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
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
    load_weights(model, state, weights)
    model.to(device).eval()
    tokenizers = {role: load_tokenizer(directory / name) for role, name in config["tokenizers"].items()}
    return Checkpoint(model, model_cfg, config["task"], tokenizers, config.get("meta", {}), directory)


def _compatible(task: str) -> tuple[str, ...]:
    # the built-in synthetic task is a translation task on made-up data
    return ("translation", "synthetic") if task == "translation" else (task,)


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
