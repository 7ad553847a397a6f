"""Writing files so that nothing is ever half-written: into a temporary file beside the target, flushed to
disk, then renamed over it (a rename within a directory is atomic). Every file the package writes goes
through here; checkpoint directories use the same idea for a whole directory (`checkpoint.save_checkpoint`)."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; when the block ends without an exception the
    content is flushed to disk and renamed over `path`, otherwise it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path, error: type[Exception], missing: str, what: str = "") -> Any:
    """Parse a JSON file. A missing file raises `error("PATH: <missing>")`, an unreadable or invalid one
    `error("PATH: unreadable<what> (why)")`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable{what} ({e})") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk, where the platform allows."""
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
