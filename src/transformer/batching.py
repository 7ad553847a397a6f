"""Batches: padding and collating examples, token-bucketed batch plans for an epoch, language-model windows.

A translation pair becomes src = tokens, tgt_in = <s> tokens, tgt_out = tokens </s> (the same sequence shifted
by one). Every batch type carries `n_tokens`, what its loss averages over, and `to(device)`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .config import TrainConfig
from .tokenizers import BOS, EOS, PAD


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
class PackedBatch:
    """Rows of packed examples: inputs, next tokens, which targets count (responses), the example of each token."""

    x: Tensor  # (B, T) token ids
    y: Tensor  # (B, T) the token after each one
    counts: Tensor  # (B, T) bool: targets in the loss
    segments: Tensor  # (B, T) the example each token belongs to (padding: an example of its own)
    n_tokens: int  # targets that count

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(self.x.to(device), self.y.to(device), self.counts.to(device), self.segments.to(device),
                           self.n_tokens)  # fmt: skip


def pack_examples(
    examples: Sequence[tuple[list[int], list[bool]]], block: int, pad: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Examples (token ids, and for each token whether predicting it counts) packed in order into rows of
    `block` (input, target) positions, an example that does not fit in what is left of a row starting the next
    one (an example longer than a row is cut to it). Returns x, y, counts, segments, each (rows, block)."""
    rows: list[list[tuple[int, int, bool, int]]] = [[]]
    for number, (ids, counted) in enumerate(examples):
        steps = [(ids[j], ids[j + 1], counted[j + 1], number) for j in range(min(len(ids) - 1, block))]
        if len(rows[-1]) + len(steps) > block:
            rows.append([])
        rows[-1].extend(steps)
    rows = [r for r in rows if r]
    x = torch.full((len(rows), block), pad, dtype=torch.long)
    y = torch.full((len(rows), block), pad, dtype=torch.long)
    counts = torch.zeros(len(rows), block, dtype=torch.bool)
    segments = torch.full((len(rows), block), -1, dtype=torch.long)  # padding: an example of its own
    for i, row in enumerate(rows):
        n = len(row)
        x[i, :n] = torch.tensor([s[0] for s in row])
        y[i, :n] = torch.tensor([s[1] for s in row])
        counts[i, :n] = torch.tensor([s[2] for s in row])
        segments[i, :n] = torch.tensor([s[3] for s in row])
    return x, y, counts, segments


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


def collate(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = PAD, bos_id: int = BOS, eos_id: int = EOS
) -> Batch:
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


def plan_batches(
    lengths: np.ndarray,
    max_tokens: int,
    max_sentences: int,
    seed: int,
    epoch: int,
    window: int = 200_000,
    block: int = 2048,
) -> list[np.ndarray]:
    """An epoch's batches (arrays of example indices) over `lengths` (N,). A corpus of at most `window`
    examples gets exactly `token_batches`' batches: all examples sorted by length (ties broken at random),
    cut into batches of at most `max_tokens` padded positions, the batches shuffled. A larger one is cut into
    blocks of `block` consecutive examples, the blocks shuffled and grouped into windows of about `window`
    examples, and each window batched so: batches of similar lengths, drawn from a few regions of the memory-
    mapped files at a time (what is read stays small). Deterministic in (seed, epoch)."""
    n = len(lengths)
    if n <= window:
        return [
            np.asarray(b, dtype=np.int64)
            for b in token_batches(lengths.tolist(), max_tokens, max_sentences, seed, epoch)
        ]
    blocks = np.random.default_rng([seed, epoch]).permutation((n + block - 1) // block)
    per_window = max(1, window // block)
    out: list[np.ndarray] = []
    for w, start in enumerate(range(0, len(blocks), per_window)):
        idx = np.concatenate(
            [np.arange(b * block, min((b + 1) * block, n)) for b in blocks[start : start + per_window]]
        )
        local = token_batches(lengths[idx].tolist(), max_tokens, max_sentences, seed * 7919 + w, epoch)
        out += [idx[np.asarray(b, dtype=np.int64)] for b in local]
    return out


class EpochBatches:
    """The batches of each epoch over examples of `lengths` (padded positions each): length-bucketed within
    large shuffled windows (`plan_batches`), at most `max_tokens` positions and `batch_size` examples,
    a pure function of (seed, epoch): resuming needs no state. The current epoch's are kept."""

    def __init__(self, lengths: np.ndarray, train: TrainConfig) -> None:
        self.lengths, self.train = np.asarray(lengths, dtype=np.int32), train
        self._epoch: Optional[int] = None
        self._batches: list[np.ndarray] = []

    def of(self, epoch: int) -> list[np.ndarray]:
        if self._epoch != epoch:
            t = self.train
            self._batches = plan_batches(self.lengths, t.max_tokens, t.batch_size, t.seed, epoch)
            self._epoch = epoch
        return self._batches

    def padding_fraction(self, epoch: int) -> float:
        pad = total = 0
        for idx in self.of(epoch):
            lens = self.lengths[idx]
            pad += int(lens.max()) * len(idx) - int(lens.sum())
            total += int(lens.max()) * len(idx)
        return pad / max(total, 1)


# ----------------------------------------------------------------------------------------------------------
# Language-model data: one long token stream, random contiguous blocks


def lm_blocks(data, block_size: int, batch_size: int, generator: torch.Generator) -> LMBatch:
    """`batch_size` random windows of a 1-D token array (a tensor, or a prepared corpus's memory map;
    len(data) > block_size): inputs (B, T) and their next tokens (B, T). Every window start 0 .. len - T - 1 is
    possible, the last one included. Only the windows are read."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    windows = torch.stack([torch.as_tensor(np.asarray(data[s : s + block_size + 1], dtype=np.int64)) for s in starts])
    return LMBatch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), batch_size * block_size)
