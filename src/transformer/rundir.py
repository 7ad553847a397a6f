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
from typing import Any, Optional

from .checkpoint import average_checkpoints
from .config import RunConfig, from_dict
from .errors import CheckpointError, TransformerError
from .files import read_json, write_text_atomic

CONFIG = "run_config.json"
METRICS = "metrics.jsonl"


def write_run_config(run_dir: Path, run: RunConfig, cpu_paths: Optional[dict] = None) -> None:
    """The recipe as it runs, and (on a CPU) the fast paths its products take (`cpu.CpuPaths`)."""
    data = run.to_dict()
    if cpu_paths is not None:
        data["cpu_paths"] = cpu_paths
    write_text_atomic(run_dir / CONFIG, json.dumps(data, indent=2, ensure_ascii=False))


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The recipe a run directory was trained with (for --resume)."""
    path = Path(run_dir) / CONFIG
    data = read_json(path, CheckpointError, f"missing; {run_dir} is not a run directory")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    data.pop("cpu_paths", None)  # the machine's, not the recipe's: `last/` holds the ones to resume with
    try:
        return from_dict(RunConfig, data)
    except TransformerError as e:
        raise CheckpointError(f"{path}: {e}") from None


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Add one line to metrics.jsonl; the file is rewritten whole and renamed, so a crash never leaves half a
    line (it is one short line per validation)."""
    path = run_dir / METRICS
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    write_text_atomic(path, old + json.dumps(record) + "\n")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def step_of(path: Path) -> Optional[int]:
    """N for a `step-N` directory, else None."""
    number = path.name[len("step-") :]
    return int(number) if path.name.startswith("step-") and number.isdigit() else None


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's step checkpoints, oldest first (by step number, not by name)."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("step-*") if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def prune_step_checkpoints(run_dir: Path, keep: int) -> None:
    for old in step_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def drop_later_steps(run_dir: Path, step: int) -> None:
    """On resume: step checkpoints beyond `step` (written after the `last/` that training resumes from, by the
    part of the run that was lost) are not this run's history and must not be averaged in."""
    for path in step_checkpoints(run_dir):
        if step_of(path) > step:
            shutil.rmtree(path, ignore_errors=True)


# What a run writes into its directory, and nothing else: `--overwrite` removes these and keeps anything else.
RUN_ENTRIES = (CONFIG, METRICS, "last", "best", "checkpoints", "averaged")


def _is_run_entry(name: str) -> bool:
    # a checkpoint's leftovers of an interrupted save (.last.1a2b3c4d.tmp) and files being written count too
    base = name[1:].split(".", 1)[0] if name.startswith(".") else name
    return name in RUN_ENTRIES or (
        name.startswith(".") and (base in RUN_ENTRIES or name[1:].startswith(CONFIG) or name[1:].startswith(METRICS))
    )


def not_a_run_dir(run_dir: Path) -> Optional[str]:
    """For `files.check_output_dir`: None when `run_dir` holds a training run (its run_config.json)."""
    return None if (run_dir / CONFIG).is_file() else f"no {CONFIG}"


def clear_run(run_dir: Path) -> None:
    """Remove what a run wrote into `run_dir` (for `train --overwrite`), keeping every other file."""
    for entry in list(run_dir.iterdir()):
        if _is_run_entry(entry.name):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def average_last(run_dir: Path, k: int, final_step: int, out: Path | None = None) -> list[Path]:
    """Average the last `k` step checkpoints into RUN_DIR/averaged, but only those from the last quarter of
    training (steps >= 3/4 of `final_step`): averaging pulls the weights towards where training was, and a
    checkpoint from long before the end (sparse validations on a slow machine) pulls them back to a worse
    model. Returns the checkpoints averaged."""
    last = step_checkpoints(run_dir)[-k:]
    recent = [p for p in last if step_of(p) >= 0.75 * final_step]
    if not recent:
        raise TransformerError(f"{run_dir}: no step checkpoints from the last quarter of training to average")
    average_checkpoints(recent, out or Path(run_dir) / "averaged", overwrite=True)  # the run's own output
    return recent
