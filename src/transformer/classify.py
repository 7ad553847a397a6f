"""Encoder-only inference on plain text: sentence embeddings and class probabilities, batched by length.

The model is a `TransformerEncoder`; the tokenizer adds what the model expects around a sentence (BERT's
[CLS] ... [SEP]). Inputs longer than the model's positions are truncated, with a warning.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

from .batching import pad_batch
from .errors import TransformerError
from .model import TransformerEncoder
from .tokenizers import Tokenizer

log = logging.getLogger("transformer")


def _batches(model: TransformerEncoder, tok: Tokenizer, texts: Sequence[str], batch_size: int):
    """Yield (indices, (B, S) ids) for `texts` in batches of similar length, truncated to the positions."""
    if batch_size < 1:
        raise TransformerError(f"batch size must be >= 1, got {batch_size}")
    cfg = model.config
    ids = tok.encode_batch(list(texts))
    limit = cfg.max_source_len
    if limit is not None:
        long = sum(len(s) > limit for s in ids)
        if long:
            log.warning("%d input(s) longer than the model's %d positions were truncated", long, limit)
            ids = [s[: limit - 1] + s[-1:] if len(s) > limit else s for s in ids]  # keep the closing token
    ids = [s or [cfg.pad_id] for s in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, pad_batch([ids[i] for i in chunk], cfg.pad_id).to(device)


@torch.no_grad()
def embed_texts(model: TransformerEncoder, tok: Tokenizer, texts: Sequence[str], batch_size: int = 64) -> Tensor:
    """(N, E) sentence embeddings of `texts`, in input order, pooled (and normalised) as the model says."""
    model.eval()
    out = torch.zeros(len(texts), model.config.d_model)
    for chunk, ids in _batches(model, tok, texts, batch_size):
        out[chunk] = model.embed(ids).float().cpu()
    return out


@torch.no_grad()
def classify_texts(model: TransformerEncoder, tok: Tokenizer, texts: Sequence[str], batch_size: int = 64) -> Tensor:
    """(N, num_labels) class probabilities of `texts`, in input order."""
    model.eval()
    out = torch.zeros(len(texts), model.config.num_labels)
    for chunk, ids in _batches(model, tok, texts, batch_size):
        out[chunk] = model.classify(ids).float().softmax(-1).cpu()
    return out
