"""The run directory a training run writes, and reading it back:

    RUN_DIR/
      run_config.json        the recipe as it ran (vocabulary sizes and precision resolved)
      metrics.jsonl          one JSON line per validation
      last/                  newest checkpoint, with its training state (what `--resume RUN_DIR` reads)
      best/                  best validation checkpoint so far
      checkpoints/step-N/    the last `keep_checkpoints` checkpoints' weights (for averaging)
      averaged/              with `train.average_last: k`, the mean of the last k of them
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import average_checkpoints
from .config import RunConfig, from_dict
from .errors import CheckpointError, TransformerError
from .files import read_json, write_text_atomic

CONFIG = "run_config.json"
METRICS = "metrics.jsonl"


def write_run_config(run_dir: Path, run: RunConfig) -> None:
    write_text_atomic(run_dir / CONFIG, json.dumps(run.to_dict(), indent=2, ensure_ascii=False))


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The recipe a run directory was trained with (for --resume)."""
    data = read_json(Path(run_dir) / CONFIG, CheckpointError, f"missing; {run_dir} is not a run directory")
    return from_dict(RunConfig, data)


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Add one line to metrics.jsonl; the file is rewritten whole and renamed, so a crash never leaves half a
    line (it is one short line per validation)."""
    path = run_dir / METRICS
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    write_text_atomic(path, old + json.dumps(record) + "\n")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's step checkpoints, oldest first."""
    return sorted((Path(run_dir) / "checkpoints").glob("step-*"))


def prune_step_checkpoints(run_dir: Path, keep: int) -> None:
    for old in step_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def average_last(run_dir: Path, k: int, final_step: int, out: Path | None = None) -> list[Path]:
    """Average the last `k` step checkpoints into RUN_DIR/averaged, but only those from the last quarter of
    training (steps >= 3/4 of `final_step`): averaging pulls the weights towards where training was, and a
    checkpoint from long before the end (sparse validations on a slow machine) pulls them back to a worse
    model. Returns the checkpoints averaged."""
    last = step_checkpoints(run_dir)[-k:]
    recent = [p for p in last if int(p.name.split("-")[1]) >= 0.75 * final_step]
    if not recent:
        raise TransformerError(f"{run_dir}: no step checkpoints from the last quarter of training to average")
    average_checkpoints(recent, out or Path(run_dir) / "averaged")
    return recent
