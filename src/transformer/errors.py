"""The one exception type for user mistakes.

Anything a user can get wrong (a config value, a file, a command-line option) raises `TransformerError` with a
one-line message that names the file, line or key and says how to fix it. The CLI prints that line and exits
with status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class TransformerError(Exception):
    """A user mistake, reported as one line (the CLI exits with status 2)."""


class ConfigError(TransformerError, ValueError):
    """An invalid configuration value or key."""


class DataError(TransformerError):
    """An unreadable or malformed data file."""


class CheckpointError(TransformerError):
    """A missing, incomplete or incompatible checkpoint directory."""
