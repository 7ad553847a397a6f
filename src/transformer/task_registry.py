"""The kinds of task a checkpoint can hold, in one table that the recipe, the checkpoint, the server and the
training tasks all read: which a recipe can train, what a command may load each as, the server's routes for
it, and the validation figure that picks its best checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TaskKind:
    name: str
    trainable: bool  # a recipe's `data.task` may name it
    loads_as: tuple[str, ...]  # the kinds a command may ask for and get this checkpoint
    routes: frozenset[str]  # the server's /v1/<route> endpoints for it
    metric: Optional[str]  # the validation figure that picks `best` (None: not trained here)


TASKS: dict[str, TaskKind] = {
    t.name: t
    for t in (
        TaskKind("translation", True, ("translation",), frozenset({"translate", "attention"}), "bleu"),
        TaskKind("lm", True, ("lm",), frozenset({"generate"}), "val_loss"),
        # instruction tuning of a language model: the loss on responses only, examples packed into windows
        TaskKind("causal-lm", True, ("lm",), frozenset({"generate"}), "val_loss"),
        # the built-in task: translation on made-up data, scored by exact match
        TaskKind("synthetic", True, ("synthetic", "translation"), frozenset({"translate", "attention"}), "exact_match"),
        # a classifier also embeds sentences
        TaskKind("classification", True, ("classification", "embedding"), frozenset({"classify", "embed"}), "accuracy"),
        # imported sentence-transformers models
        TaskKind("embedding", False, ("embedding",), frozenset({"embed"}), None),
    )
}

TRAINABLE = tuple(name for name, t in TASKS.items() if t.trainable)


def loadable_as(kind: str) -> tuple[str, ...]:
    """The checkpoint tasks a command that needs `kind` accepts."""
    return tuple(name for name, t in TASKS.items() if kind in t.loads_as)


def routes(task: str) -> frozenset[str]:
    """The server's routes for a checkpoint of `task` (none for a task this package does not know)."""
    t = TASKS.get(task)
    return t.routes if t is not None else frozenset()
