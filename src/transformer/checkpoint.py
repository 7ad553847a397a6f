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
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .config import ModelConfig, from_dict
from .errors import CheckpointError, ConfigError, TransformerError
from .files import (
    check_output_dir,
    foreign_entries,
    fsync_dir,
    read_json,
    recover_directory,
    replace_directory,
    temporary_sibling,
    write_json_atomic,
)
from .model import build_model
from .task_registry import loadable_as
from .tokenizers import Tokenizer, load_tokenizer

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
    overwrite: bool = False,
) -> Path:
    """Write a complete checkpoint directory, atomically: everything goes into a temporary sibling directory
    that replaces `directory` only once it is complete, so a crash never leaves a half-written checkpoint.
    `tokenizers` maps a role ("src", "tgt") to a tokenizer; a tokenizer shared by two roles is stored once.
    `directory` must be new or empty, or (with `overwrite`) hold a checkpoint and nothing else: a directory
    holding other files is never replaced (TransformerError). Every file is recorded with its SHA-256, checked
    on load."""
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    recover(directory, clean=True)
    check_output_dir(directory, "checkpoint", _not_a_checkpoint, overwrite)
    tmp = temporary_sibling(directory)
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
        others = sorted({*files.values(), *([STATE_TENSORS, STATE_JSON] if training_state is not None else [])})
        config = {
            "format_version": FORMAT_VERSION,
            "task": task,
            "model": model.config.to_dict(),
            "tokenizers": files,
            "weights_sha256": file_sha256(tmp / WEIGHTS),  # checked on load: a changed weights file is refused
            "files_sha256": {name: file_sha256(tmp / name) for name in others},  # and so is any other file
            "meta": meta or {},
        }
        write_json_atomic(tmp / CONFIG, config)
        fsync_dir(tmp)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _not_a_checkpoint(directory: Path) -> Optional[str]:
    """For `check_output_dir`: None when `directory` holds a checkpoint and nothing else."""
    try:
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
        names = {CONFIG, WEIGHTS, STATE_TENSORS, STATE_JSON, *config["tokenizers"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no readable {CONFIG} of a checkpoint"
    return foreign_entries(directory, lambda name: name in names)


def recover(directory: Path, clean: bool = False) -> None:
    """Finish an interrupted replacement of a checkpoint directory (`files.recover_directory`)."""
    recover_directory(directory, clean)


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
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this package reads version {FORMAT_VERSION})"
        )
    for key in ("task", "model", "tokenizers"):
        if key not in config:
            raise CheckpointError(f"{path}: missing key '{key}'")
    return config


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu", task: Optional[str] = None
) -> Checkpoint:
    """Load a checkpoint directory. Raises CheckpointError naming the file (and tensor) for anything missing,
    corrupt or of the wrong shape; `task` checks that the checkpoint is of the expected kind."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    if task is not None and config["task"] not in loadable_as(task):
        raise CheckpointError(f"{directory}: is a '{config['task']}' checkpoint, but this command needs a '{task}' one")
    try:
        model_cfg = from_dict(ModelConfig, config["model"], prefix="model.")
    except ConfigError as e:
        raise CheckpointError(f"{directory / CONFIG}: {e}") from None
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing weights file")
    _check_files(directory, config)
    _check_shapes(model_cfg, weights)  # before building: a wrong or huge config is an error, not an OOM
    model = build_model(model_cfg)
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: corrupt or truncated weights file ({e})") from None
    expected = config.get("weights_sha256")  # absent in checkpoints written before it was recorded
    if expected is not None and file_sha256(weights) != expected:
        raise CheckpointError(
            f"{weights}: the file differs from the one saved with this checkpoint (its SHA-256 "
            f"does not match {CONFIG}); it was changed or damaged after saving"
        )
    load_weights(model, state, weights)
    model.to(device).eval()
    files = {name: load_tokenizer(directory / name) for name in set(config["tokenizers"].values())}
    tokenizers = {role: files[name] for role, name in config["tokenizers"].items()}  # a joint one: one object
    _check_vocabularies(model_cfg, tokenizers, config["tokenizers"], directory)
    return Checkpoint(model, model_cfg, config["task"], tokenizers, config.get("meta", {}), directory)


def _check_files(directory: Path, config: dict[str, Any]) -> None:
    """Every file the checkpoint names is a plain name inside it, and each file beside the weights (which
    `load_checkpoint` checks itself) is the one saved with it (SHA-256; checkpoints written before a file's
    digest was recorded have none to check)."""
    names = config["tokenizers"]
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise CheckpointError(f"{directory / CONFIG}: 'tokenizers' must map roles to file names")
    for role, name in names.items():
        if Path(name).name != name or name in ("", ".", ".."):  # absolute, or with a directory part
            raise CheckpointError(
                f"{directory / CONFIG}: tokenizers.{role} = {name!r} is not a file name inside {directory}"
            )
    for name, expected in (config.get("files_sha256") or {}).items():
        path = directory / Path(str(name)).name
        if expected is None or not path.is_file():
            continue  # a missing file is reported by whoever reads it
        if file_sha256(path) != expected:
            raise CheckpointError(
                f"{path}: the file differs from the one saved with this checkpoint (its SHA-256 "
                f"does not match {CONFIG}); it was changed or damaged after saving"
            )


def _check_shapes(cfg: ModelConfig, weights: Path) -> None:
    """Compare the shapes `cfg` implies with those in the weights file's header, reading no tensor data and
    allocating no parameter (the model is built on the meta device)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: corrupt or truncated weights file ({e})") from None
    layers = cfg.n_encoder_layers + cfg.n_decoder_layers
    if layers > len(shapes):  # every layer has tensors of its own: a config this deep cannot be these weights
        raise CheckpointError(
            f"{weights}: the configuration has {layers} layers but the file holds only "
            f"{len(shapes)} tensors (a different model?)"
        )
    with torch.device("meta"):
        expected = build_model(cfg).state_dict()
    for name, shape in shapes.items():
        if name in expected and tuple(expected[name].shape) != shape:
            raise CheckpointError(
                f"{weights}: tensor '{name}' has shape {shape}, the configuration in {CONFIG} "
                f"implies {tuple(expected[name].shape)}"
            )


def _check_vocabularies(
    cfg: ModelConfig, tokenizers: dict[str, Tokenizer], names: dict[str, str], directory: Path
) -> None:
    """A tokenizer may not give ids the model has no embedding for (a swapped tokenizer file)."""
    for role, tok in tokenizers.items():
        size = getattr(cfg, f"{role}_vocab_size", 0)
        if size and tok.vocab_size > size:
            raise CheckpointError(
                f"{directory / names[role]}: the {role} tokenizer has {tok.vocab_size} tokens "
                f"but the model's {role}_vocab_size is {size} (a tokenizer of another model?)"
            )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
                    f"{source}: tensor '{found[0]}' has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            target.copy_(tensor)


def average_checkpoints(paths: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """Average the weights of several checkpoints of one model into a new checkpoint directory `out` (the
    first one's tokenizers and metadata, plus `averaged_from`). `overwrite`: as for `save_checkpoint`."""
    check_output_dir(out, "checkpoint", _not_a_checkpoint, overwrite)  # before the work, not after it
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
    return save_checkpoint(out, first.model, first.task, first.tokenizers, meta, overwrite=overwrite)


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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / STATE_JSON).is_file():
        raise CheckpointError(f"{directory}: no resumable checkpoint (missing {STATE_JSON})")
    ckpt = load_checkpoint(directory)  # checks the training-state files' digests too
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
        meta = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
        opt = meta.pop("optimizer")
        state = {
            name: {k: tensors[f"optimizer.{name}.{k}"] if v == "tensor" else v for k, v in entry.items()}
            for name, entry in opt["state"].items()
        }
        for g in opt["param_groups"]:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        meta["position"]["step"]  # noqa: B018 - present, or the state is not one this package wrote
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise CheckpointError(
            f"{directory}: unreadable training state ({type(e).__name__}: {e}); resume from "
            "another checkpoint or start the run afresh"
        ) from None
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    return TrainingState(ckpt, {"state": state, "param_groups": opt["param_groups"]}, rng, meta)
