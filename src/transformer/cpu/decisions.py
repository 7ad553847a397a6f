"""The one per-machine record of timed choices: `files.cache_root()/cpu/<digest of machine_key()>.json`.

A timing near a margin could otherwise choose one way in one process and the other in the next, and two
processes (two runs of a recipe, a run and its resumed half, two decodings) would sum in different orders.
So each choice is timed once per machine and kept here, in sections (`paths`: oneDNN's paths, `step`: the
decoding step's products). The file is locked from reading to writing, so that processes starting together
do not each time and record their own, and written whole (temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from ..files import cache_root, make_private_dirs, write_json_atomic
from .machine import machine_key

try:
    import fcntl
except ImportError:  # not on Windows: there, processes starting together may each time and record their own
    fcntl = None


def path() -> Path:
    key = machine_key()
    return cache_root() / "cpu" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _read(file: Path, machine: str) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):  # none yet, or a damaged one: decided again and written whole
        return {}
    if not isinstance(data, dict) or data.get("machine") != machine:
        return {}
    return {k: v for k, v in data.items() if k != "machine" and isinstance(v, dict)}


def recorded(section: str, name: str, decide: Callable[[], object], valid: Callable[[object], bool]):
    """The value this machine recorded for `name` in `section` where `valid(value)`, else `decide()`'s,
    recorded now for every later process. Raises OSError where the record cannot be read or written."""
    file, machine = path(), machine_key()
    make_private_dirs(file.parent)
    with open(file.with_suffix(".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        sections = _read(file, machine)
        entries = sections.setdefault(section, {})
        if name not in entries or not valid(entries[name]):
            entries[name] = decide()
            write_json_atomic(file, {"machine": machine, **sections})
        return entries[name]


def record(section: str, name: str, value: object) -> None:
    """Record `value` for `name` in `section`, whatever was there (tests fix choices this way)."""
    recorded(section, name, lambda: value, lambda old: old == value)
