"""The HTML pages this package serves or writes, kept as files beside this module (package data)."""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def template(name: str) -> str:
    """The text of the page `name` (e.g. "attention.html")."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
