"""Text in, batches out: tokenizers, reading data files, token-bucketed batches, the built-in tasks.

Every tokenizer reserves the same four ids: <pad>=0, <s>=1 (begin), </s>=2 (end), <unk>=3. A translation
pair becomes src = tokens, tgt_in = <s> tokens, tgt_out = tokens </s> (the same sequence shifted by one).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .files import read_json, write_text_atomic

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


# ----------------------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_text(self, id: int) -> str: ...

    def save(self, path: Path) -> None: ...


class CharTokenizer:
    """One token per character; characters not seen in training map to <unk>."""

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        self.itos = SPECIALS + self.chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(sorted(seen))

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, UNK) for c in text]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIALS) and i < self.vocab_size)

    def token_text(self, id: int) -> str:
        return self.itos[id] if 0 <= id < self.vocab_size else "<unk>"

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False))


class BPETokenizer:
    """Subword tokenizer (byte-pair encoding, Hugging Face `tokenizers`), trained on the training text.

    NFKC-normalised; spaces are kept as the "▁" marker, so decoding gives back plain detokenised text.
    """

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        self.tok = tok
        self.tok.encode_special_tokens = True  # the text "<s>" is four characters, never the begin token
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def train_unigram(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """SentencePiece's unigram model: the vocabulary that maximises the likelihood of the text under a
        unigram language model of subwords, pruned from a large seed set (Kudo 2018)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        tok = HFTokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>",
                                          show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def train_bytes(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Byte-level BPE (as GPT-2): no normalisation and no unknown tokens, so any Unicode text, whitespace
        included, decodes back exactly."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([i for i in ids if i >= len(SPECIALS)], skip_special_tokens=True)

    def token_text(self, id: int) -> str:
        return self.tok.id_to_token(id) or "<unk>"

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), self.tok.to_str())


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """"char": one token per character; "bpe": subwords over NFKC-normalised words (spaces kept as "▁");
    "bytebpe": byte-level subwords, exact for any text; "sentencepiece": SentencePiece's unigram language-model
    subwords (as `tokenizers` implements them), spaces kept as "▁"."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bytebpe":
        return BPETokenizer.train_bytes(texts, vocab_size)
    if kind == "sentencepiece":
        return BPETokenizer.train_unigram(texts, vocab_size)
    return BPETokenizer.train(texts, vocab_size)


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer saved by `save` (JSON only: nothing is unpickled)."""
    path = Path(path)
    data = read_json(path, DataError, "tokenizer file not found", what=" tokenizer file")
    if isinstance(data, dict) and data.get("type") == "char":
        return CharTokenizer(data["chars"])
    if isinstance(data, dict) and data.get("type") in ("pretrained", "sentencepiece"):  # imported models'
        from .interop.tokenizers import PretrainedTokenizer, SentencePieceTokenizer

        kind = PretrainedTokenizer if data["type"] == "pretrained" else SentencePieceTokenizer
        return kind.from_saved(data, path)
    if isinstance(data, dict) and "model" in data:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return BPETokenizer(HFTokenizer.from_str(json.dumps(data)))
        except Exception as e:  # the library's own parse errors
            raise DataError(f"{path}: invalid tokenizer file ({e})") from None
    raise DataError(f"{path}: not a tokenizer file this package wrote")


# ----------------------------------------------------------------------------------------------------------
# Reading text files


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
        raise DataError(f"{path}:{number}: invalid UTF-8 (byte {raw[e.start]:#04x}); convert the file to UTF-8") from None
    if number == 1 and line.startswith("\ufeff"):
        line = line[1:]
    return line.strip() if strip else line.removesuffix("\r")


def read_lines(path: str | Path, what: str = "data file", strip: bool = True) -> list[str]:
    """All lines of a UTF-8 text file (see `iter_lines`); an empty file is a DataError naming it."""
    lines = list(iter_lines(path, what, strip))
    if not any(lines):
        raise DataError(f"{Path(path)}: {what} is empty")
    return lines


def read_parallel(src: Optional[str], tgt: Optional[str], tsv: Optional[str], split: str) -> tuple[list[str], list[str]]:
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
# Batching


@dataclass
class Batch:
    """A batch of translation pairs. Every batch type has `n_tokens` (the target tokens its loss averages
    over, counted once, here) and `to(device)`."""

    src: Tensor  # (B, S) source ids, right-padded
    tgt_in: Tensor  # (B, T) <s> + target
    tgt_out: Tensor  # (B, T) target + </s>
    n_tokens: int  # real target tokens (what the loss averages over)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device), self.n_tokens)


@dataclass
class LMBatch:
    """A batch of language-model windows: inputs and their next tokens."""

    x: Tensor  # (B, T) token ids
    y: Tensor  # (B, T) the token after each one
    n_tokens: int

    def to(self, device: torch.device | str) -> "LMBatch":
        return LMBatch(self.x.to(device), self.y.to(device), self.n_tokens)


@dataclass
class ClassBatch:
    """A batch of labelled texts; the loss averages over examples, so `n_tokens` counts examples."""

    ids: Tensor  # (B, S) token ids, right-padded
    labels: Tensor  # (B,) class indices
    n_tokens: int

    def to(self, device: torch.device | str) -> "ClassBatch":
        return ClassBatch(self.ids.to(device), self.labels.to(device), self.n_tokens)


def pad_batch(seqs: Sequence[Sequence[int]], pad: int = PAD) -> Tensor:
    """Sequences of ids -> a (B, longest) tensor, right-padded with `pad`."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def collate(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = PAD, bos_id: int = BOS,
            eos_id: int = EOS) -> Batch:
    """(source ids, target ids) pairs -> a Batch padded with `pad_id`; targets start with `bos_id` and end with
    `eos_id` (the model's ids)."""
    src = pad_batch([s for s, _ in pairs], pad_id)
    tgt_in = pad_batch([[bos_id, *t] for _, t in pairs], pad_id)
    tgt_out = pad_batch([[*t, eos_id] for _, t in pairs], pad_id)
    return Batch(src, tgt_in, tgt_out, sum(len(t) + 1 for _, t in pairs))


def token_batches(
    lengths: Sequence[int], max_tokens: int, max_sentences: int = 0, seed: int = 0, epoch: int = 0, shuffle: bool = True
) -> list[list[int]]:
    """Group example indices into batches of at most `max_tokens` padded positions (longest x count).

    Examples are sorted by length (ties broken at random per epoch) so each batch holds similar lengths and
    little padding; then the batches are shuffled. The same (seed, epoch) always gives the same batches.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    noise = [rng.random() for _ in lengths] if shuffle else [0.0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], noise[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(longest, lengths[i])
        full = n * (len(current) + 1) > max_tokens or (max_sentences and len(current) >= max_sentences)
        if current and full:
            batches.append(current)
            current, n = [], lengths[i]
        current.append(i)
        longest = n
    if current:
        batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


def pair_lengths(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[int]:
    return [max(len(s), len(t) + 1) for s, t in pairs]


# ----------------------------------------------------------------------------------------------------------
# Language-model data: one long token stream, random contiguous blocks


def lm_blocks(data, block_size: int, batch_size: int, generator: torch.Generator) -> LMBatch:
    """`batch_size` random windows of a 1-D token array (a tensor, or a prepared corpus's memory map;
    len(data) > block_size): inputs (B, T) and their next tokens (B, T). Every window start 0 .. len - T - 1 is
    possible, the last one included. Only the windows are read."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    windows = torch.stack([torch.as_tensor(np.asarray(data[s : s + block_size + 1], dtype=np.int64)) for s in starts])
    return LMBatch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), batch_size * block_size)


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
