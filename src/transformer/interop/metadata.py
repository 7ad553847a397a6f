"""Reading a foreign model directory's own metadata without trusting it.

A config.json written by someone else may lack a key, hold a value of the wrong type, or not be a JSON object
at all; a modules.json may name a path outside its directory. `Keys` reads config values by type and `inside`
joins a path name read from metadata, each raising CheckpointError that names the file and the key or entry,
so that a bad directory is one line from the CLI rather than a KeyError or TypeError traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError

REQUIRED = object()  # a `default` meaning: the key must be present


def show(value: Any) -> str:
    """A JSON value as it appears in the file (null, true), shortened: for messages."""
    text = json.dumps(value) if value is None or isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no integer


class Keys:
    """The values of one JSON config file, read by type. A null counts as absent (transformers reads it as
    None, which means "the default" for the optional keys read here)."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise CheckpointError(f'{where}: must be a JSON object ({{"key": value, ...}}), got {show(data)}')
        self.data, self.where = data, where

    def error(self, key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: key {key!r} {what}")

    def _value(self, key: str, default: Any, kind: str, ok: Callable[[Any], bool]) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is REQUIRED:
                raise self.error(key, "is missing" if key not in self.data else f"must be {kind}, got null")
            return default
        if not ok(value):
            raise self.error(key, f"must be {kind}, got {show(value)}")
        return value

    def integer(self, key: str, default: Any = REQUIRED, low: int = 1) -> Any:
        """An integer >= `low` (sizes: 1, so that a 0 or negative size is refused by its key)."""
        value = self._value(key, default, "an integer", _is_int)
        if value is not default and value < low:
            raise self.error(key, f"must be >= {low}, got {show(value)}")
        return value

    def token_id(self, key: str, default: Any, several: bool = False) -> Any:
        """A token id; `several`: a list of ids is allowed too (transformers' eos_token_id), its first one taken."""
        kind = "a token id (an integer >= 0)" + (" or a list of them" if several else "")

        def ok(v: Any) -> bool:
            ids = v if several and isinstance(v, list) and v else [v]
            return all(_is_int(i) and i >= 0 for i in ids)

        value = self._value(key, default, kind, ok)
        return value[0] if isinstance(value, list) else value

    def token_ids(self, key: str, default: Any) -> Any:
        """Every id of a key that holds a token id or a list of them (generation_config's eos_token_id)."""

        def ok(v: Any) -> bool:
            ids = v if isinstance(v, list) and v else [v]
            return all(_is_int(i) and i >= 0 for i in ids)

        value = self._value(key, default, "a token id (an integer >= 0) or a list of them", ok)
        return value if isinstance(value, list) or value is default else [value]

    def number(self, key: str, default: Any) -> Any:
        return self._value(key, default, "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))

    def flag(self, key: str, default: bool) -> bool:
        return self._value(key, default, "true or false", lambda v: isinstance(v, bool))

    def text(self, key: str, default: Any = REQUIRED) -> Any:
        return self._value(key, default, "a string", lambda v: isinstance(v, str))

    def texts(self, key: str, default: Any) -> Any:
        def ok(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(s, str) for s in v)

        return self._value(key, default, "a list of strings", ok)

    def mapping(self, key: str, default: Any = REQUIRED) -> Any:
        return self._value(key, default, "a JSON object", lambda v: isinstance(v, dict))


def inside(root: Path, name: Any, source: Path, entry: str) -> Path:
    """`root / name` for a path `name` read from `source` (a file of `root`), refused unless it stays inside
    `root` once resolved: an absolute name, `..` or a symbolic link could otherwise make an import read any
    file of the machine."""
    if not isinstance(name, str):
        raise CheckpointError(f"{source}: {entry} must be a path name (a string), got {show(name)}")
    base = root.resolve()
    target = (root / name).resolve()
    if target != base and base not in target.parents:
        raise CheckpointError(f"{source}: {entry}={name!r} points outside {root} (to {target}); refused")
    return root / name
