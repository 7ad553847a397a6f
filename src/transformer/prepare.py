"""Prepare a corpus once; train from memory-mapped token arrays.

The first `transformer train` of a recipe (or `transformer prepare CONFIG`) trains the tokenizer on a bounded
sample of the text (`data.tokenizer_sample_lines` lines of each file), then streams the files a block of lines
at a time through it (the `tokenizers` library encodes a block on all cores), dropping the pairs a recipe drops
(a blank side, longer than `data.max_len`), and writes:

    CACHE/<key>/
      meta.json              written last: its presence means the rest is complete (a preparation that is
                             interrupted leaves only a `.tmp-*` directory, which nothing trusts and the next
                             preparation of that corpus removes)
      *tokenizer.json        the tokenizer(s)
      src.bin, tgt.bin       every kept sentence's token ids, one after another (uint16, or uint32 for a
                             vocabulary over 65,535 tokens)
      index.npy              per pair: where its source and target start, and their lengths
      lengths.npy            per pair: the padded positions it takes (what batching needs)
      (language-model text: train.bin and val.bin, one token stream each)

`<key>` digests the data files' identity (path, size, modification and change times, inode), the content of a
reused tokenizer (`data.tokenizer_from`) and every setting that changes the tokens, so a second run, or a
resumed one, finds the corpus prepared and starts at once. CACHE is `data.cache_dir`, else the package's
cache root (`files.cache_root()`) / prepared. A preparation holds a lock (`CACHE/.lock-<key>`, flock) while it works: a
second process preparing the same corpus waits, then uses it. Training reads batches from the memory maps
(see `tasks.py`), so its memory does not grow with the corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from itertools import islice, zip_longest
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: preparations are not serialised there (`_finish` still keeps a complete corpus)
    fcntl = None

from . import files
from .config import RunConfig
from .data import iter_lines
from .errors import DataError
from .files import fsync_dir, read_json, write_json_atomic
from .tokenizers import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger("transformer")

FORMAT = 1
CHUNK = 20_000  # lines encoded at a time


def cache_root(run: RunConfig) -> Path:
    """Where `run`'s prepared corpora go: `data.cache_dir`, else `files.cache_root()` / prepared."""
    if run.data.cache_dir:
        return Path(run.data.cache_dir)
    return files.cache_root() / "prepared"


# ----------------------------------------------------------------------------------------------------------
# What a prepared corpus gives the tasks


@dataclass
class PreparedPairs:
    """Sentence pairs in memory-mapped token arrays."""

    directory: Path
    tokenizers: dict[str, Tokenizer]
    stats: dict

    def __post_init__(self) -> None:
        d, dtype = self.directory, np.dtype(self.stats["dtype"])
        self.src, self.tgt = (
            np.memmap(d / "src.bin", dtype=dtype, mode="r"),
            np.memmap(d / "tgt.bin", dtype=dtype, mode="r"),
        )
        self.index = np.load(d / "index.npy", mmap_mode="r")  # (N, 4): source offset, length, target offset, length

    def __len__(self) -> int:
        return len(self.index)

    def pair(self, i: int) -> tuple[list[int], list[int]]:
        s, n, t, m = (int(x) for x in self.index[i])
        return self.src[s : s + n].tolist(), self.tgt[t : t + m].tolist()

    def lengths(self) -> np.ndarray:
        """(N,) padded positions each pair takes: max(source tokens, target tokens + 1)."""
        return np.load(self.directory / "lengths.npy")


@dataclass
class PreparedText:
    """A language model's text: one memory-mapped token stream for training, one for validation."""

    directory: Path
    tokenizers: dict[str, Tokenizer]
    stats: dict

    def __post_init__(self) -> None:
        dtype = np.dtype(self.stats["dtype"])
        self.train = np.memmap(self.directory / "train.bin", dtype=dtype, mode="r")
        self.val = np.memmap(self.directory / "val.bin", dtype=dtype, mode="r")


# ----------------------------------------------------------------------------------------------------------
# Finding or making the prepared corpus


def prepare(run: RunConfig, tokenizers: Optional[dict[str, Tokenizer]] = None) -> PreparedPairs | PreparedText:
    """The prepared corpus of `run`'s training data (translation or language-model text), made if need be.
    `tokenizers` (a resumed or fine-tuned run's) are used instead of training new ones."""
    d = run.data
    if d.task not in ("translation", "lm"):
        raise DataError(f"data.task={d.task!r}: only translation and language-model corpora are prepared")
    given = _digest(tokenizers) if tokenizers else None
    root = cache_root(run)
    own = _key(run, given)
    keys = list(dict.fromkeys((_key(run, None), own)))  # a resumed run finds the corpus its first run made
    found = _find(root, keys, given)
    if found is not None:
        return found
    target = root / own
    with _locked(target):
        found = _find(root, keys, given)  # another process prepared it while this one waited for the lock
        if found is not None:
            return found
        _remove_stale(target)
        build = _prepare_pairs if d.task == "translation" else _prepare_text
        return build(run, tokenizers, target, given)


def _find(root: Path, keys: Sequence[str], digest: Optional[str]):
    for key in keys:
        found = _open(root / key, digest)
        if found is not None:
            log.info("using the prepared corpus %s", root / key)
            return found
    return None


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold the lock of the preparation `target` (an flock on CACHE/.lock-<key>) while the block runs; another
    process preparing the same corpus waits for it. The kernel drops a lock when its holder dies, so an
    interrupted preparation never leaves one held; the (empty) lock files stay, for the next preparation."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        f = open(target.parent / f".lock-{target.name}", "ab")
    except OSError as e:
        raise DataError(
            f"{target.parent}: cannot write the prepared-corpus cache ({e.strerror}); "
            "set data.cache_dir or $TRANSFORMER_CACHE to a writable directory"
        ) from None
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process preparing %s", target)
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _remove_stale(target: Path) -> None:
    """Remove the `.tmp-<key>-*` directories interrupted preparations of `target` left. Called with the lock
    held, and a preparation holds it while its directory exists: none of these is in use."""
    for tmp in target.parent.glob(f".tmp-{target.name}-*"):
        log.info("removing %s, left by an interrupted preparation", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _open(directory: Path, digest: Optional[str]):
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        return None
    meta = read_json(meta_file, DataError, "missing")
    if meta.get("format") != FORMAT or (digest is not None and meta.get("tokenizer_digest") != digest):
        return None
    toks = {role: load_tokenizer(directory / name) for role, name in meta["tokenizers"].items()}
    if meta["tokenizers"].get("src") == meta["tokenizers"].get("tgt") and "src" in toks:
        toks["tgt"] = toks["src"]  # a joint vocabulary: one object, as training made it
    kind = PreparedPairs if meta["kind"] == "pairs" else PreparedText
    return kind(directory, toks, meta)


def _key(run: RunConfig, tokenizer_digest: Optional[str]) -> str:
    d = run.data
    files = [p for p in (d.train_src, d.train_tgt, d.train_tsv, d.text) if p]
    identity = [_file_identity(Path(name)) for name in files]
    settings = {
        k: getattr(d, k)
        for k in ("task", "tokenizer", "vocab_size", "joint_vocab", "max_len", "val_fraction", "tokenizer_sample_lines")
    }
    # a reused tokenizer by what it holds, not where it lies: another one saved over the same path is another corpus
    settings["tokenizer_from"] = _tokenizer_source_digest(d.tokenizer_from) if d.tokenizer_from else None
    blob = json.dumps(
        {"format": FORMAT, "files": identity, "settings": settings, "tokenizer": tokenizer_digest}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _file_identity(path: Path) -> list:
    """What tells two versions of a data file apart without reading it. Size and modification time miss a
    same-size edit whose old mtime was restored (`cp -p`, `touch -r`); but every write, and setting the mtime,
    moves the change time (which nobody can set back), and replacing the file changes its inode."""
    try:
        st = path.stat()
    except OSError:  # reading it will say what is wrong, naming the file
        return [str(path), None, None, None, None]
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _tokenizer_source_digest(source: str) -> str:
    """SHA-256 of the tokenizer file `data.tokenizer_from` names; of a checkpoint directory, of the tokenizer
    files its config.json names, with the roles they serve."""
    path = Path(source)
    digest = hashlib.sha256()
    try:
        if path.is_dir():
            names = json.loads((path / "config.json").read_text(encoding="utf-8"))["tokenizers"]
            digest.update(json.dumps(names, sort_keys=True).encode())
            for name in sorted(set(names.values())):  # file names inside it, as loading checks
                digest.update(hashlib.sha256((path / Path(str(name)).name).read_bytes()).digest())
        else:
            digest.update(path.read_bytes())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # loading it will name what is wrong
        return f"unreadable: {source}"
    return digest.hexdigest()


def _digest(tokenizers: dict[str, Tokenizer]) -> str:
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        for role in sorted(tokenizers):
            tokenizers[role].save(Path(tmp) / role)
            digest.update(role.encode() + (Path(tmp) / role).read_bytes())
    return digest.hexdigest()[:20]


def _fresh_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def _finish(tmp: Path, target: Path, meta: dict) -> None:
    """Write meta.json last, then move the directory into place (a complete corpus or none). Should the target
    appear meanwhile (a process that took no lock), it is as complete as this one: keep it."""
    write_json_atomic(tmp / "meta.json", meta)
    fsync_dir(tmp)
    if not (target / "meta.json").is_file():
        try:
            os.replace(tmp, target)
            return
        except OSError as e:  # the target is there (a non-empty directory cannot be replaced)
            if not (target / "meta.json").is_file():
                raise DataError(
                    f"{target}: cannot move the prepared corpus into place ({e.strerror}); "
                    "remove that directory and prepare again"
                ) from None
    shutil.rmtree(tmp, ignore_errors=True)  # another process prepared it meanwhile: keep theirs


def _tokenizers(run: RunConfig, tokenizers, sample_src: list[str], sample_tgt: Optional[list[str]]):
    d = run.data
    if tokenizers:
        return tokenizers
    if d.tokenizer_from:
        return tokenizers_from(d.tokenizer_from, joint=d.joint_vocab or sample_tgt is None)
    if sample_tgt is None:
        tok = train_tokenizer(d.tokenizer, sample_src, d.vocab_size)
        return {"tgt": tok}
    if d.joint_vocab:
        tok = train_tokenizer(d.tokenizer, [*sample_src, *sample_tgt], d.vocab_size)
        return {"src": tok, "tgt": tok}
    return {
        "src": train_tokenizer(d.tokenizer, sample_src, d.vocab_size),
        "tgt": train_tokenizer(d.tokenizer, sample_tgt, d.vocab_size),
    }


def tokenizers_from(path: str | Path, joint: bool = True) -> dict[str, Tokenizer]:
    """Tokenizers to reuse (`data.tokenizer_from`): a checkpoint directory's, or one tokenizer file."""
    path = Path(path)
    if path.is_dir():
        from .checkpoint import load_checkpoint

        return load_checkpoint(path).tokenizers
    tok = load_tokenizer(path)
    return {"src": tok, "tgt": tok}


def _save_tokenizers(tmp: Path, toks: dict[str, Tokenizer]) -> dict[str, str]:
    files = {}
    for role, tok in toks.items():
        shared = sum(t is tok for t in toks.values()) > 1
        files[role] = "tokenizer.json" if shared else f"{role}_tokenizer.json"
        if not (tmp / files[role]).exists():
            tok.save(tmp / files[role])
    return files


def _dtype(toks: dict[str, Tokenizer]) -> np.dtype:
    return np.dtype(np.uint16 if max(t.vocab_size for t in toks.values()) <= 65535 else np.uint32)


# ----------------------------------------------------------------------------------------------------------
# Pairs


def _pair_lines(run: RunConfig) -> Iterator[tuple[str, str, int]]:
    """(source, target, line number) of the training pairs, streamed from the files."""
    d = run.data
    if d.train_tsv:
        for n, line in enumerate(iter_lines(d.train_tsv, "train pairs file"), 1):
            if not line:
                yield "", "", n
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(
                    f"{d.train_tsv}:{n}: expected 'source<TAB>target', found {len(parts)} tab-separated fields"
                )
            yield parts[0].strip(), parts[1].strip(), n
        return
    if not d.train_src or not d.train_tgt:
        raise DataError("data: the train data needs both train_src and train_tgt (or train_tsv)")
    for path, what in ((d.train_src, "train source file"), (d.train_tgt, "train target file")):
        if next((line for line in iter_lines(path, what) if line), None) is None:
            raise DataError(f"{path}: {what} is empty")
    src, tgt = iter_lines(d.train_src, "train source file"), iter_lines(d.train_tgt, "train target file")
    for n, (s, t) in enumerate(zip_longest(src, tgt), 1):
        if s is None or t is None:  # one file ended first
            count = [sum(1 for _ in iter_lines(f)) for f in (d.train_src, d.train_tgt)]
            raise DataError(
                f"{d.train_src} has {count[0]} lines but {d.train_tgt} has {count[1]}: the files must be line-aligned"
            )
        yield s, t, n


def _prepare_pairs(run: RunConfig, tokenizers, target: Path, digest: Optional[str]) -> PreparedPairs:
    d = run.data
    started = time.perf_counter()
    sample = list(islice(_pair_lines(run), d.tokenizer_sample_lines))
    if not any(s or t for s, t, _ in sample):
        raise DataError(f"{d.train_src or d.train_tsv}: train source file is empty")
    toks = _tokenizers(run, tokenizers, [s for s, _, _ in sample], [t for _, t, _ in sample])
    del sample
    src_tok, tgt_tok = toks["src"], toks["tgt"]
    tmp, dtype = _fresh_dir(target), _dtype(toks)
    try:
        lengths: dict[str, list[np.ndarray]] = {"src": [], "tgt": []}
        stats = {"lines": 0, "kept": 0, "blank": 0, "too_long": 0}
        with open(tmp / "src.bin", "wb") as fs, open(tmp / "tgt.bin", "wb") as ft:
            stream = _pair_lines(run)
            while chunk := list(islice(stream, CHUNK)):
                src_ids = src_tok.encode_batch([s for s, _, _ in chunk])
                tgt_ids = tgt_tok.encode_batch([t for _, t, _ in chunk])
                kept = []
                for s, t in zip(src_ids, tgt_ids):  # the same rule as data.encode_pairs
                    if not s or not t:
                        stats["blank"] += 1
                    elif len(s) > d.max_len or len(t) + 1 > d.max_len:
                        stats["too_long"] += 1
                    else:
                        kept.append((s, t))
                stats["lines"] += len(chunk)
                stats["kept"] += len(kept)
                for side, f, k in (("src", fs, 0), ("tgt", ft, 1)):
                    seqs = [p[k] for p in kept]
                    lengths[side].append(np.array([len(x) for x in seqs], dtype=np.int32))
                    if seqs:
                        f.write(np.fromiter((i for x in seqs for i in x), dtype=dtype).tobytes())
        if not stats["kept"]:
            raise DataError(f"{d.train_src or d.train_tsv}: no usable training pairs (all blank or too long)")
        cols = []
        for side in ("src", "tgt"):
            lens = np.concatenate(lengths[side]).astype(np.int64)
            cols += [np.concatenate([[0], np.cumsum(lens[:-1])]), lens]
        np.save(tmp / "index.npy", np.stack(cols, axis=1))
        np.save(tmp / "lengths.npy", np.maximum(cols[1], cols[3] + 1).astype(np.int32))
        seconds = time.perf_counter() - started
        meta = {
            "format": FORMAT,
            "kind": "pairs",
            "dtype": dtype.name,
            "tokenizers": _save_tokenizers(tmp, toks),
            "tokenizer_digest": digest or _digest(toks),
            "seconds": round(seconds, 1),
            **stats,
            "bytes": sum(f.stat().st_size for f in tmp.iterdir()),
        }
        _finish(tmp, target, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "prepared %d pairs (%d blank and %d longer than %d tokens dropped) in %.1f s, %.0f lines/s, %.1f MB: %s",
        stats["kept"],
        stats["blank"],
        stats["too_long"],
        d.max_len,
        seconds,
        stats["lines"] / max(seconds, 1e-9),
        meta["bytes"] / 1e6,
        target,
    )
    return _open(target, None) or _open(target, digest)


# ----------------------------------------------------------------------------------------------------------
# Language-model text


def _text_blocks(path: Path, start: int, end: int, block: int = 1 << 20) -> Iterator[str]:
    """The text between byte offsets start and end, in blocks that end at a newline (so no token straddles)."""
    with open(path, "rb") as f:
        f.seek(start)
        left, rest = end - start, b""
        while left > 0:
            data = f.read(min(block, left))
            if not data:  # the file ends before `end`: it was cut since its size was taken (reading on would spin)
                raise DataError(
                    f"{path}: the file changed while being prepared (it is shorter than when "
                    "preparation began); prepare again once nothing writes to it"
                )
            left -= len(data)
            data = rest + data
            cut = data.rfind(b"\n") + 1 if left > 0 else len(data)  # the last block takes what is left
            piece, rest = data[:cut], data[cut:]
            if not piece:  # no newline yet: read on
                continue
            try:
                yield piece.decode("utf-8").replace("\r\n", "\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: invalid UTF-8 near byte {start + e.start}") from None


def _prepare_text(run: RunConfig, tokenizers, target: Path, digest: Optional[str]) -> PreparedText:
    d = run.data
    if not d.text:
        raise DataError("data.text: a language-model task needs the path of a text file")
    path = Path(d.text)
    try:
        size = path.stat().st_size
    except OSError:
        raise DataError(f"{path}: text file not found") from None
    if size == 0 or (size <= 64 << 20 and not _decoded(path).strip()):
        raise DataError(f"{path}: text file is empty")
    started = time.perf_counter()
    split = _split_point(path, size, d.val_fraction)  # the first (1 - val_fraction) of the text trains
    sample = "".join(islice(_text_blocks(path, 0, split), max(1, d.tokenizer_sample_lines // 10_000)))
    toks = _tokenizers(run, tokenizers, [sample], None) if not tokenizers else tokenizers
    del sample
    tok, tmp = toks["tgt"], _fresh_dir(target)
    dtype = _dtype(toks)
    try:
        counts = {}
        for name, (a, b) in (("train", (0, split)), ("val", (split, size))):
            with open(tmp / f"{name}.bin", "wb") as f:
                n = 0
                for piece in _text_blocks(path, a, b):
                    ids = tok.encode(piece)
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
                    n += len(ids)
            counts[name] = n
        meta = {
            "format": FORMAT,
            "kind": "text",
            "dtype": dtype.name,
            "tokenizers": _save_tokenizers(tmp, {"tgt": tok}),
            "tokenizer_digest": digest or _digest({"tgt": tok}),
            "tokens": counts,
            "seconds": round(time.perf_counter() - started, 1),
            "bytes": size,
        }
        _finish(tmp, target, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %d training and %d validation tokens of %s: %s", counts["train"], counts["val"], path, target)
    return _open(target, None) or _open(target, digest)


def _split_point(path: Path, size: int, val_fraction: float) -> int:
    """The byte offset where validation text begins: after (1 - val_fraction) of the characters (of the bytes,
    for a text over 64 MB), at a character boundary."""
    if size <= 64 << 20:
        text = _decoded(path)
        return len(text[: int(len(text) * (1 - val_fraction))].encode("utf-8"))
    cut = int(size * (1 - val_fraction))
    with open(path, "rb") as f:
        f.seek(cut)
        while cut < size and (f.read(1)[0] & 0xC0) == 0x80:  # not inside a multi-byte character
            cut += 1
    return cut


def _decoded(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None


__all__: Sequence[str] = ["prepare", "PreparedPairs", "PreparedText", "tokenizers_from", "cache_root"]
