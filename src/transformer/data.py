"""Text files in: reading lines, parallel and labelled data with errors that name the file and line, pairs
tokenised with a length limit, and the built-in task (no downloads).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from .errors import DataError
from .tokenizers import Tokenizer


def iter_lines(path: str | Path, what: str = "data file", strip: bool = True) -> Iterator[str]:
    """The lines of a UTF-8 text file, read a block at a time (a corpus need not fit in memory), stripped (so
    CRLF, trailing spaces and NBSP-only lines are handled; `strip=False` removes only the CR of a CRLF, keeping
    the tabs of a TSV line); a leading BOM is dropped. Errors name the file and, for bad UTF-8, the line.

    Lines end at "\n" only, as `wc -l` counts them: str.splitlines() would also split at U+2028, U+0085, form
    feeds and more, and silently shift one side of a line-aligned pair of files against the other."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: {what} is a directory, expected a text file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror})") from None
    number, rest = 0, b""
    with f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            for raw in parts:
                number += 1
                yield _decode_line(raw, path, number, strip)
    if rest:  # a last line without its newline
        yield _decode_line(rest, path, number + 1, strip)


def _decode_line(raw: bytes, path: Path, number: int, strip: bool) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{number}: invalid UTF-8 (byte {raw[e.start]:#04x}); convert the file to UTF-8"
        ) from None
    if number == 1 and line.startswith("\ufeff"):
        line = line[1:]
    return line.strip() if strip else line.removesuffix("\r")


def read_lines(path: str | Path, what: str = "data file", strip: bool = True) -> list[str]:
    """All lines of a UTF-8 text file (see `iter_lines`); an empty file is a DataError naming it."""
    lines = list(iter_lines(path, what, strip))
    if not any(lines):
        raise DataError(f"{Path(path)}: {what} is empty")
    return lines


def read_parallel(
    src: Optional[str], tgt: Optional[str], tsv: Optional[str], split: str
) -> tuple[list[str], list[str]]:
    """Line-aligned source/target files, or one tab-separated file of pairs."""
    if tsv:
        src_lines, tgt_lines = [], []
        for i, line in enumerate(read_lines(tsv, f"{split} pairs file"), 1):
            if not line:
                src_lines.append("")
                tgt_lines.append("")
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(f"{tsv}:{i}: expected 'source<TAB>target', found {len(parts)} tab-separated fields")
            src_lines.append(parts[0].strip())
            tgt_lines.append(parts[1].strip())
        return src_lines, tgt_lines
    if not src or not tgt:
        raise DataError(f"data: the {split} data needs both {split}_src and {split}_tgt (or {split}_tsv)")
    s, t = read_lines(src, f"{split} source file"), read_lines(tgt, f"{split} target file")
    if len(s) != len(t):
        raise DataError(f"{src} has {len(s)} lines but {tgt} has {len(t)}: the files must be line-aligned")
    return s, t


_HEADER_LABELS = {"label", "labels", "class", "target", "y"}
_HEADER_TEXTS = {"text", "texts", "sentence", "sentences", "content", "review", "document", "phrase", "input"}


def _is_integer(label: str) -> bool:
    return label.lstrip("-").isdigit()


def _is_header(line: str, labels: Sequence[str]) -> bool:
    """Whether the first line of a `label<TAB>text` file is a header, given the labels of the data (`known`,
    else the other lines' labels). See `read_labelled`."""
    label, _, text = line.partition("\t")
    label, text = label.strip(), text.strip()
    if not label or label in labels:  # a label the data uses: a genuine line, however rare
        return False
    if label.lower() in _HEADER_LABELS or text.lower() in _HEADER_TEXTS:  # a column name
        return True
    # a word above integer labels ("sentiment" over 0/1) cannot be one of them
    return bool(labels) and not _is_integer(label) and all(_is_integer(l) for l in labels)


def read_labelled(path: str | Path, what: str, known: Optional[Sequence[str]] = None) -> tuple[list[str], list[str]]:
    """`label<TAB>text` lines -> (labels, texts). Blank lines are skipped. A line without a label or text, or
    (given `known`) with a label not among them, is a DataError naming file and line.

    The first line is a header, and skipped, only when its label field is not a label of the data (not among
    `known`, or without `known`, on no other line) and it looks like a column name: the label field is one
    ("label", "class", ...), or the text field is ("sentence", "text", "content", ...), or the label is a word
    while the data's labels are all integers. SST-2's `label<TAB>sentence` is one. A first line whose label
    appears on no other line is otherwise data: a class with one example is kept, never taken for a header."""
    lines = read_lines(path, what, strip=False)
    labels = list(known) if known is not None else {l.split("\t")[0].strip() for l in lines[1:] if l.strip()}
    start = 1 if _is_header(lines[0], sorted(labels)) else 0
    out_labels, texts = [], []
    for n, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        label, _, text = line.partition("\t")
        label, text = label.strip(), text.strip()
        if not label or not text:
            raise DataError(f"{path}:{n}: expected 'label<TAB>text', found {'no text' if label else 'no label'}")
        if known is not None and label not in known:
            raise DataError(f"{path}:{n}: label {label!r} is not one of the training labels ({', '.join(known)})")
        out_labels.append(label)
        texts.append(text)
    if not out_labels:
        raise DataError(f"{path}: {what} has no labelled lines")
    return out_labels, texts


def read_instructions(path: str | Path, what: str = "instruction file") -> list[tuple[int, dict]]:
    """The records of a JSONL file of instructions, each with its line number: {"prompt": str, "response": str}
    or {"messages": [{"role": str, "content": str}, ...]} with at least one "assistant" message. A line that is
    not such a record is a DataError naming the file and line; blank lines are skipped."""
    import json

    records = []
    for number, line in enumerate(iter_lines(path, what), 1):
        if not line:
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "messages" in record:
            messages = record["messages"]
            ok = isinstance(messages, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
            if not ok or not any(m["role"] == "assistant" for m in messages):
                raise DataError(
                    f'{where}: "messages" must be a list of {{"role": ..., "content": ...}} strings with at least '
                    "one assistant message"
                )
        elif not (isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str)):
            raise DataError(f'{where}: a record needs "prompt" and "response" strings, or "messages"')
        records.append((number, record))
    if not records:
        raise DataError(f"{path}: no records (one JSON object per line)")
    return records


def label_names(labels: Iterable[str]) -> list[str]:
    """The distinct labels in class order: numerically if all are integers, else alphabetically."""
    distinct = set(labels)
    numeric = all(_is_integer(l) for l in distinct)
    return sorted(distinct, key=(lambda l: int(l)) if numeric else None)


@dataclass
class PairStats:
    kept: int
    blank: int
    too_long: int


def encode_pairs(
    src_tok: Tokenizer, tgt_tok: Tokenizer, src: Sequence[str], tgt: Sequence[str], max_len: int
) -> tuple[list[tuple[list[int], list[int]]], PairStats]:
    """Tokenise pairs, dropping blank ones and ones longer than `max_len` tokens on either side (+1 for the
    begin/end token)."""
    src_ids, tgt_ids = src_tok.encode_batch(src), tgt_tok.encode_batch(tgt)
    pairs, blank, too_long = [], 0, 0
    for s, t in zip(src_ids, tgt_ids):
        if not s or not t:
            blank += 1
        elif len(s) > max_len or len(t) + 1 > max_len:
            too_long += 1
        else:
            pairs.append((s, t))
    return pairs, PairStats(len(pairs), blank, too_long)


# ----------------------------------------------------------------------------------------------------------
# The built-in task: no downloads


class SyntheticTask:
    """Deterministic sequence-to-sequence puzzles over lowercase letters, lengths `min_len`..`max_len`.

    "reverse": "hello" -> "olleh";  "sort": "hello" -> "ehllo";  "copy": "hello" -> "hello".
    """

    TASKS = ("reverse", "sort", "copy")
    ALPHABET = "abcdefghijklmnopqrstuvwxyz"

    def __init__(self, name: str = "reverse", min_len: int = 1, max_len: int = 16) -> None:
        if name not in self.TASKS:
            raise DataError(f"synthetic_task={name!r}: must be one of {', '.join(self.TASKS)}")
        self.name, self.min_len, self.max_len = name, min_len, max_len

    def solve(self, text: str) -> str:
        if self.name == "reverse":
            return text[::-1]
        if self.name == "sort":
            return "".join(sorted(text))
        return text

    def sample(self, rng: random.Random) -> str:
        n = rng.randint(self.min_len, self.max_len)
        return "".join(rng.choice(self.ALPHABET) for _ in range(n))

    def split(self, n_train: int, n_val: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Train and held-out pairs; no held-out source appears in training."""
        rng = random.Random(seed)
        val_src: list[str] = []
        seen: set[str] = set()
        while len(val_src) < n_val:
            s = self.sample(rng)
            if s not in seen:
                seen.add(s)
                val_src.append(s)
        train_src: list[str] = []
        while len(train_src) < n_train:
            s = self.sample(rng)
            if s not in seen:
                train_src.append(s)
        return [(s, self.solve(s)) for s in train_src], [(s, self.solve(s)) for s in val_src]
