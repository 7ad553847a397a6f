"""Writing files so that nothing is ever half-written: into a temporary file beside the target, flushed to
disk, then renamed over it (a rename within a directory is atomic). Every file the package writes goes
through here; checkpoint directories use the same idea for a whole directory (`checkpoint.save_checkpoint`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


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


# ----------------------------------------------------------------------------------------------------------
# Output directories: a command writes only where it may, and replaces a directory whole or not at all


def check_output_dir(
    path: str | Path, kind: str, holds: Callable[[Path], Optional[str]], overwrite: bool, flag: str = "--overwrite"
) -> Path:
    """Check that a command may write a `kind` (e.g. "checkpoint") to the directory `path`, before it writes
    anything. A missing or empty directory may be written; one that already holds a `kind` only with
    `overwrite` (the message names `flag`); anything else never, whatever the flag: the command would delete
    or mix with files it did not write. `holds(path)` returns None when `path` holds a `kind` that may be
    replaced, else what it holds instead (e.g. "'notes.txt', which is not part of a checkpoint").
    Raises TransformerError naming the directory; returns `path`."""
    from .errors import TransformerError

    path = Path(path)
    real, cwd = path.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise TransformerError(
            f"{path}: is the current directory (or one above it); write the {kind} to a new directory instead"
        )
    if not path.exists():
        return path
    if not path.is_dir():
        raise TransformerError(f"{path}: exists and is not a directory; choose another output directory")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return path
    other = holds(path)
    if other is not None:
        held = ", ".join(repr(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise TransformerError(
            f"{path}: is not empty and does not hold a {kind} ({other}; it holds {held}); "
            "nothing was written: choose a new or empty directory"
        )
    if not overwrite:
        raise TransformerError(f"{path}: already holds a {kind}; {flag} replaces it")
    return path


def foreign_entries(path: Path, own: Callable[[str], bool]) -> Optional[str]:
    """For `check_output_dir`'s `holds`: None if every entry of `path` is one `own(name)` accepts, else the
    first other entry, described."""
    others = sorted(p.name for p in path.iterdir() if not own(p.name))
    return f"'{others[0]}' is not part of one" if others else None


def replace_directory(tmp: Path, directory: Path) -> None:
    """Put the complete directory `tmp` (a sibling of `directory`) in `directory`'s place. The old one is first
    renamed aside to `.NAME.*.old`, so a process killed between the two renames leaves the old directory
    there for `recover_directory` to put back; it is deleted only once the new one is in place."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_directory(directory: Path, clean: bool = False) -> None:
    """Finish an interrupted `replace_directory`: if `directory` is missing and an old one was set aside, put
    it back. `clean` (a writer's call) also removes leftovers (`.NAME.*.old`, `.NAME.*.tmp`) of killed writes."""
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


def temporary_sibling(directory: Path) -> Path:
    """A new, empty directory beside `directory` to write its replacement into (`replace_directory`)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    return tmp


def cache_root() -> Path:
    """This package's cache: $TRANSFORMER_CACHE, else $XDG_CACHE_HOME/transformer, else ~/.cache/transformer."""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("TRANSFORMER_CACHE") or os.path.join(home, "transformer"))


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and its missing parents, each 0700 (`mkdir(parents=True)` would make the parents with
    the umask's mode, group-writable under umask 002, and `_unsafe_directory` would then refuse our own cache)."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)


@contextlib.contextmanager
def new_directory(
    directory: str | Path, kind: str, holds: Callable[[Path], Optional[str]], overwrite: bool
) -> Iterator[Path]:
    """Write a whole directory of output: check `directory` may take a `kind` (`check_output_dir`), yield an
    empty temporary sibling to write into, and put it in `directory`'s place only when the block ends without
    an exception (else it is removed and `directory` is untouched)."""
    directory = Path(directory)
    recover_directory(directory, clean=True)
    check_output_dir(directory, kind, holds, overwrite)
    tmp = temporary_sibling(directory)
    try:
        yield tmp
        replace_directory(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
