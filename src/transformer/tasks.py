"""Tasks: what a run trains on and how it is scored. The trainer sees a task only through this interface:

    num_batches(epoch)        batches in one pass over the training data
    batch(epoch, i)           the i-th batch of an epoch (deterministic from the seed: resuming needs no state);
                              it carries `n_tokens`, the target tokens its loss averages over
    loss(model, batch)        the mean loss of the batch (a scalar tensor)
    validate(model)           a dict of validation figures; `metric` names the one that picks the best checkpoint
    tokenizers, name          what the checkpoint stores

`TranslationTask` serves parallel text and the built-in synthetic task; `LanguageModelTask` serves plain text.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .batching import (
    Batch,
    ClassBatch,
    EpochBatches,
    LMBatch,
    PackedBatch,
    collate,
    lm_blocks,
    pack_examples,
    pad_batch,
    pair_lengths,
    token_batches,
)
from .config import RunConfig
from .data import SyntheticTask, encode_pairs, label_names, read_instructions, read_labelled, read_parallel
from .errors import DataError
from .metrics import accuracy, bleu_score, exact_match, macro_f1
from .prepare import prepare
from .task_registry import TASKS
from .tokenizers import CharTokenizer, Tokenizer

log = logging.getLogger("transformer")


class InMemoryPairs:
    """Sentence pairs held in memory (the built-in task's), with `PreparedPairs`' interface."""

    def __init__(self, pairs: Sequence[tuple[list[int], list[int]]]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def pair(self, i: int) -> tuple[list[int], list[int]]:
        return self.pairs[i]

    def lengths(self) -> np.ndarray:
        return np.asarray(pair_lengths(self.pairs), dtype=np.int32)


class TranslationTask:
    """Sequence-to-sequence pairs in token-bucketed batches; validated by loss and BLEU (or exact match).

    Args:
        run: the recipe (batch size in tokens, seed, label smoothing, validation settings, the model's pad id).
        src_tok, tgt_tok: the tokenizers (one object twice for a joint vocabulary).
        pairs: the training pairs, (source ids, target ids) without <s>/</s>: a prepared corpus's memory maps
            (`prepare.PreparedPairs`), or `InMemoryPairs`.
        val_src, val_tgt: validation sentences as text (BLEU is computed on detokenised text).
        name: "translation", or "synthetic" for the built-in task (validated by exact match).
    """

    def __init__(
        self,
        run: RunConfig,
        src_tok: Tokenizer,
        tgt_tok: Tokenizer,
        pairs,
        val_src: Sequence[str],
        val_tgt: Sequence[str],
        name: str = "translation",
    ) -> None:
        self.run, self.name = run, name
        self.src_tok, self.tgt_tok = src_tok, tgt_tok
        self.pairs = pairs
        self.batches = EpochBatches(pairs.lengths(), run.train)
        self.val_src, self.val_tgt = list(val_src), list(val_tgt)
        self.val_pairs, _ = encode_pairs(src_tok, tgt_tok, self.val_src, self.val_tgt, run.data.max_len)
        self.metric = TASKS[name].metric

    @property
    def tokenizers(self) -> dict[str, Tokenizer]:
        return {"src": self.src_tok, "tgt": self.tgt_tok}

    def num_batches(self, epoch: int) -> int:
        return len(self.batches.of(epoch))

    def batch(self, epoch: int, i: int) -> Batch:
        """The i-th batch of `epoch`: src (B, S), tgt_in and tgt_out (B, T), padded with the model's pad id."""
        return self._collate([self.pairs.pair(int(j)) for j in self.batches.of(epoch)[i]])

    def _collate(self, pairs) -> Batch:
        m = self.run.model
        return collate(pairs, m.pad_id, m.bos_id, m.eos_id)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Label-smoothed cross entropy, averaged over the batch's `n_tokens` target tokens."""
        return model.loss(batch.src, batch.tgt_in, batch.tgt_out, self.run.train.label_smoothing)

    def padding_fraction(self, epoch: int) -> float:
        return self.batches.padding_fraction(epoch)

    @torch.no_grad()
    def validate(self, model: nn.Module, translate: Callable[[Sequence[str]], list[str]]) -> dict[str, Any]:
        """Validation loss (no label smoothing) over all validation pairs, and BLEU / exact match of the
        decoded first `eval_bleu_sentences` sentences."""
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for idx in token_batches(pair_lengths(self.val_pairs), self.run.train.max_tokens, 0, shuffle=False):
            b = self._collate([self.val_pairs[j] for j in idx]).to(device)
            total += float(model.loss(b.src, b.tgt_in, b.tgt_out, 0.0)) * b.n_tokens
            count += b.n_tokens
        out: dict[str, Any] = {"val_loss": total / max(count, 1)}
        n = self.run.train.eval_bleu_sentences or len(self.val_src)
        if n > 0:
            hyps = translate(self.val_src[:n])
            refs = self.val_tgt[:n]
            out[self.metric] = exact_match(hyps, refs) if self.metric == "exact_match" else bleu_score(hyps, refs)
        return out


class LanguageModelTask:
    """One text file as a token stream: random contiguous windows for training, a fixed set for validation.

    Args:
        run: the recipe (block size, batch size, seed, label smoothing).
        tok: the tokenizer.
        train_ids, val_ids: (N,) token ids of the training and validation text, each longer than a block.
        eval_batches: windows of validation text scored at each validation, in batches.
    """

    name = "lm"
    metric = TASKS["lm"].metric

    def __init__(
        self, run: RunConfig, tok: Tokenizer, train_ids: Tensor, val_ids: Tensor, eval_batches: int = 20
    ) -> None:
        self.run, self.tok = run, tok
        self.train_ids, self.val_ids = train_ids, val_ids
        self.eval_batches = eval_batches
        d, t = run.data, run.train
        self.batch_size = t.batch_size or max(1, t.max_tokens // d.block_size)
        for split, ids in (("training", train_ids), ("validation", val_ids)):
            if len(ids) <= d.block_size:  # a window needs block_size inputs and one more token to predict
                raise DataError(
                    f"{d.text}: the {split} split has {len(ids)} tokens, fewer than data.block_size+1="
                    f"{d.block_size + 1}; use a longer text or a smaller block_size"
                )

    @property
    def tokenizers(self) -> dict[str, Tokenizer]:
        return {"tgt": self.tok}

    def num_batches(self, epoch: int) -> int:
        return max(1, len(self.train_ids) // (self.batch_size * self.run.data.block_size))

    def batch(self, epoch: int, i: int) -> LMBatch:
        """`batch_size` random windows of the training text, x and y (B, block_size)."""
        g = torch.Generator().manual_seed(hash((self.run.train.seed, epoch, i)) & 0x7FFFFFFF)
        return lm_blocks(self.train_ids, self.run.data.block_size, self.batch_size, g)

    def loss(self, model: nn.Module, batch: LMBatch) -> Tensor:
        """Next-token cross entropy, averaged over the batch's tokens."""
        return model.loss(batch.x, batch.y, self.run.train.label_smoothing)

    def padding_fraction(self, epoch: int) -> float:
        return 0.0

    @torch.no_grad()
    def validate(self, model: nn.Module, translate: Any = None) -> dict[str, Any]:
        model.eval()
        g = torch.Generator().manual_seed(1234)
        losses = []
        device = next(model.parameters()).device
        for _ in range(self.eval_batches):
            b = lm_blocks(self.val_ids, self.run.data.block_size, self.batch_size, g).to(device)
            losses.append(float(model.loss(b.x, b.y, 0.0)))
        return {"val_loss": sum(losses) / len(losses)}


class CausalLMTask:
    """Instruction tuning: prompt/response (or chat) examples packed into windows of `data.block_size`, the loss
    on response tokens only, no attention across the examples of a window; validated by the response loss.

    Args:
        run: the recipe (block size, batch size in windows or tokens, seed, label smoothing).
        tok: the tokenizer (a pretrained model's).
        train, val: (token ids, which tokens count) per example (`encode_instruction`).
        chat: the chat template the examples were rendered with, kept in checkpoints.
    """

    name = "causal-lm"
    metric = TASKS["causal-lm"].metric

    def __init__(self, run: RunConfig, tok: Tokenizer, train: list, val: list, chat: dict, pad: int) -> None:
        self.run, self.tok, self.chat = run, tok, chat
        d, t = run.data, run.train
        self.train = pack_examples(train, d.block_size, pad)
        self.val = pack_examples(val, d.block_size, pad)
        self.rows = t.batch_size or max(1, t.max_tokens // d.block_size)
        cut = sum(len(ids) > d.block_size + 1 for ids, _ in train)
        log.info("%d training examples packed into %d windows of %d tokens%s", len(train), len(self.train[0]),
                 d.block_size, f"; {cut} longer than a window were cut to it" if cut else "")  # fmt: skip

    @property
    def tokenizers(self) -> dict[str, Tokenizer]:
        return {"tgt": self.tok}

    @property
    def meta(self) -> dict[str, Any]:
        return {"chat": self.chat} if self.chat else {}

    def num_batches(self, epoch: int) -> int:
        return max(1, -(-len(self.train[0]) // self.rows))

    def batch(self, epoch: int, i: int) -> PackedBatch:
        """Windows i * rows ... of this epoch's order (shuffled by seed and epoch)."""
        g = torch.Generator().manual_seed(hash((self.run.train.seed, epoch)) & 0x7FFFFFFF)
        order = torch.randperm(len(self.train[0]), generator=g)[i * self.rows : (i + 1) * self.rows]
        return _packed(self.train, order)

    def loss(self, model: nn.Module, batch: PackedBatch) -> Tensor:
        return model.loss(batch.x, batch.y, self.run.train.label_smoothing, batch.segments, batch.counts)

    def padding_fraction(self, epoch: int) -> float:
        return float((self.train[3] < 0).float().mean())

    @torch.no_grad()
    def validate(self, model: nn.Module, translate: Any = None) -> dict[str, Any]:
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(self.val[0]), self.rows):
            b = _packed(self.val, torch.arange(start, min(start + self.rows, len(self.val[0])))).to(device)
            total += float(model.loss(b.x, b.y, 0.0, b.segments, b.counts)) * b.n_tokens
            count += b.n_tokens
        return {"val_loss": total / max(count, 1)}


def _packed(packed: tuple[Tensor, ...], rows: Tensor) -> PackedBatch:
    x, y, counts, segments = (t[rows] for t in packed)
    return PackedBatch(x, y, counts, segments, int(counts.sum()))


def encode_instruction(record: dict, tok, chat: dict, eos: int, where: str) -> tuple[list[int], list[bool]]:
    """One record's token ids and, for each, whether predicting it counts: a prompt/response record is the
    prompt (with the tokenizer's own start tokens), then the response and the end token, which count; a chat
    record is the conversation in the model's chat template, its assistant turns counting."""
    if "messages" not in record:
        prompt, response = tok.encode(record["prompt"]), _plain(tok, record["response"]) + [eos]
        return prompt + response, [False] * len(prompt) + [True] * len(response)
    if not chat.get("template"):
        raise DataError(f"{where}: a chat record needs a model with a chat template (tokenizer_config.json's)")
    from .chat import render_chat

    messages, special = record["messages"], chat.get("special_tokens")
    ids = _plain(tok, render_chat(chat["template"], messages, False, special))
    counted = [False] * len(ids)
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _plain(tok, render_chat(chat["template"], messages[:j], True, special)) if j else []
        through = _plain(tok, render_chat(chat["template"], messages[: j + 1], False, special))
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise DataError(f"{where}: the chat template does not render this conversation turn by turn")
        counted[len(before) : len(through)] = [True] * (len(through) - len(before))
    return ids, counted


def _plain(tok, text: str) -> list[int]:
    return tok.encode_plain(text) if hasattr(tok, "encode_plain") else tok.encode(text)


class ClassificationTask:
    """Labelled texts in length-bucketed batches (at most `batch_size` texts, `max_tokens` padded tokens each);
    validated by accuracy and macro-F1, the loss averaged over examples.

    Args:
        run: the recipe.
        tok: the tokenizer (an imported model's, which adds its [CLS] ... [SEP]).
        labels: the class names, in class-index order (stored in checkpoints as `meta["labels"]`).
        train: (token ids, class index) per training example.
        val_texts, val_labels: validation texts and their class indices.
    """

    name = "classification"
    metric = TASKS["classification"].metric

    def __init__(
        self,
        run: RunConfig,
        tok: Tokenizer,
        labels: Sequence[str],
        train: Sequence[tuple[list[int], int]],
        val_texts: Sequence[str],
        val_labels: Sequence[int],
    ) -> None:
        self.run, self.tok, self.labels = run, tok, list(labels)
        self.train = list(train)
        self.batches = EpochBatches(np.array([len(ids) for ids, _ in self.train]), run.train)
        self.val_texts, self.val_labels = list(val_texts), list(val_labels)

    @property
    def tokenizers(self) -> dict[str, Tokenizer]:
        return {"src": self.tok}

    @property
    def meta(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def num_batches(self, epoch: int) -> int:
        return len(self.batches.of(epoch))

    def batch(self, epoch: int, i: int) -> ClassBatch:
        """The i-th batch of `epoch`: ids (B, S) padded with the model's pad id, labels (B,)."""
        chosen = [self.train[int(j)] for j in self.batches.of(epoch)[i]]
        ids = pad_batch([t for t, _ in chosen], self.run.model.pad_id)
        return ClassBatch(ids, torch.tensor([c for _, c in chosen]), len(chosen))

    def loss(self, model: nn.Module, batch: ClassBatch) -> Tensor:
        """Cross entropy of the batch's labels, averaged over its examples."""
        return model.loss(batch.ids, batch.labels, self.run.train.label_smoothing)

    def padding_fraction(self, epoch: int) -> float:
        return self.batches.padding_fraction(epoch)

    @torch.no_grad()
    def validate(self, model: nn.Module, translate: Any = None) -> dict[str, Any]:
        """Validation loss, accuracy and macro-F1 over all validation texts."""
        from .classify import classify_texts

        probs = classify_texts(model, self.tok, self.val_texts, batch_size=64)
        gold = torch.tensor(self.val_labels)
        loss = float(torch.nn.functional.nll_loss(probs.clamp(min=1e-12).log(), gold))
        return {"val_loss": loss, **classification_scores(probs.argmax(-1).tolist(), self.val_labels, len(self.labels))}


def classification_scores(predicted: Sequence[int], gold: Sequence[int], n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean over classes of each class's F1)."""
    return {"accuracy": accuracy(predicted, gold), "macro_f1": macro_f1(predicted, gold, n_classes)}


# ----------------------------------------------------------------------------------------------------------
# Building a task from a recipe


def build_task(run: RunConfig, tokenizers: Optional[dict[str, Tokenizer]] = None):
    """Read and tokenise the data a recipe names. `tokenizers` (from a checkpoint, when resuming) are reused;
    otherwise they are trained on the training data."""
    d = run.data
    if d.task == "synthetic":
        return _synthetic(run, tokenizers)
    if d.task == "lm":
        return _language_model(run, tokenizers)
    if d.task == "causal-lm":
        return _causal_lm(run, tokenizers)
    if d.task == "classification":
        return _classification(run, tokenizers)
    return _translation(run, tokenizers)


def _classification(run: RunConfig, tokenizers: Optional[dict[str, Tokenizer]]) -> ClassificationTask:
    d = run.data
    if not d.train_tsv or not d.val_tsv:
        raise DataError("data: a classification task needs data.train_tsv and data.val_tsv ('label<TAB>text' lines)")
    if not tokenizers:
        raise DataError(
            "data: a classification task starts from a pretrained model: set model.init_from "
            "(e.g. a checkpoint made by `transformer import`)"
        )
    tok = tokenizers.get("src") or tokenizers["tgt"]
    raw, texts = read_labelled(d.train_tsv, "training file")
    labels = label_names(raw)
    index = {name: i for i, name in enumerate(labels)}
    val_raw, val_texts = read_labelled(d.val_tsv, "validation file", known=labels)
    ids = tok.encode_batch(texts)
    cut = sum(len(t) > d.max_len for t in ids)
    if cut:
        log.info("%d training text(s) longer than data.max_len=%d tokens were truncated", cut, d.max_len)
    train = [(t[: d.max_len - 1] + t[-1:] if len(t) > d.max_len else t, index[c]) for t, c in zip(ids, raw)]
    log.info("training examples: %d in %d classes (%s)", len(train), len(labels), ", ".join(labels))
    return ClassificationTask(run, tok, labels, train, val_texts, [index[c] for c in val_raw])


def _synthetic(run: RunConfig, tokenizers: Optional[dict[str, Tokenizer]]) -> TranslationTask:
    d = run.data
    task = SyntheticTask(d.synthetic_task, d.synthetic_min_len, d.synthetic_max_len)
    train, val = task.split(d.synthetic_train_size, d.synthetic_val_size, seed=run.train.seed)
    tok = tokenizers["src"] if tokenizers else CharTokenizer(SyntheticTask.ALPHABET)
    pairs, _ = encode_pairs(tok, tok, [s for s, _ in train], [t for _, t in train], d.max_len)
    return TranslationTask(
        run, tok, tok, InMemoryPairs(pairs), [s for s, _ in val], [t for _, t in val], name="synthetic"
    )


def _translation(run: RunConfig, tokenizers: Optional[dict[str, Tokenizer]]) -> TranslationTask:
    """Parallel text, prepared once into memory-mapped token arrays (`prepare.py`) and batched from them."""
    d = run.data
    if not (d.val_src or d.val_tgt or d.val_tsv):
        raise DataError("data: no validation data; set data.val_src and data.val_tgt (or data.val_tsv)")
    val_src, val_tgt = read_parallel(d.val_src, d.val_tgt, d.val_tsv, "val")
    prepared = prepare(run, tokenizers)
    stats = prepared.stats
    log.info(
        "training pairs: %d kept, %d blank dropped, %d longer than %d tokens dropped",
        stats["kept"],
        stats["blank"],
        stats["too_long"],
        d.max_len,
    )
    keep = [i for i, (s, t) in enumerate(zip(val_src, val_tgt)) if s and t]
    toks = prepared.tokenizers
    return TranslationTask(
        run, toks["src"], toks["tgt"], prepared, [val_src[i] for i in keep], [val_tgt[i] for i in keep]
    )


def _language_model(run: RunConfig, tokenizers: Optional[dict[str, Tokenizer]]) -> LanguageModelTask:
    """One text file, prepared once into two memory-mapped token streams (training, validation)."""
    prepared = prepare(run, tokenizers)
    return LanguageModelTask(run, prepared.tokenizers["tgt"], prepared.train, prepared.val)


def _causal_lm(run: RunConfig, tokenizers: Optional[dict[str, Tokenizer]]) -> CausalLMTask:
    """JSONL instructions, rendered and tokenised with the starting model's tokenizer and chat template."""
    from .files import read_json

    d = run.data
    builtin = not d.train_jsonl and not d.val_jsonl
    if not builtin and not (d.train_jsonl and d.val_jsonl):
        raise DataError(
            "data: a causal-lm task needs both data.train_jsonl and data.val_jsonl (one JSON record a line)"
        )
    if not tokenizers:
        raise DataError("data: a causal-lm task starts from a language model: set model.init_from (a checkpoint)")
    # the starting model's end and padding ids and chat template (the recipe's model section sets neither)
    model, chat = {"eos_id": run.model.eos_id, "pad_id": run.model.pad_id}, {}
    if run.model.init_from:
        config = read_json(Path(run.model.init_from) / "config.json", DataError, "missing")
        chat = (config.get("meta") or {}).get("chat") or {}
        model.update({k: v for k, v in (config.get("model") or {}).items() if k in model})
    tok = tokenizers["tgt"]
    if builtin:  # no files: the built-in task's strings as instructions ("reverse: abc" -> "cba")
        log.info("no data.train_jsonl: instructions made from the built-in task %r", d.synthetic_task)
        task = SyntheticTask(d.synthetic_task, d.synthetic_min_len, d.synthetic_max_len)
        splits = task.split(d.synthetic_train_size, d.synthetic_val_size, seed=run.train.seed)
        records = [[(i, {"prompt": f"{d.synthetic_task}: {a}\n", "response": b}) for i, (a, b) in enumerate(split, 1)]
                   for split in splits]  # fmt: skip
        where = ["built-in task", "built-in task"]
    else:
        records = [read_instructions(d.train_jsonl), read_instructions(d.val_jsonl)]
        where = [d.train_jsonl, d.val_jsonl]
    sets = [[encode_instruction(r, tok, chat, model["eos_id"], f"{w}:{n}") for n, r in recs]
            for recs, w in zip(records, where)]  # fmt: skip
    return CausalLMTask(run, tok, sets[0], sets[1], chat, model["pad_id"])
