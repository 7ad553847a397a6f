"""Encoder-only commands over texts from the arguments, a file or stdin: `classify` and `embed`."""

from __future__ import annotations

import argparse
import json

from .common import device_option, load, positive_int, read_inputs


def _texts_command(sub, name: str, help: str, what: str, json_help: str, fn) -> None:
    c = sub.add_parser(name, help=help)
    c.add_argument("checkpoint")
    c.add_argument("text", nargs="*", help=f"{what} (default: read lines from stdin)")
    c.add_argument("--input", help=f"read {what} from this file, one per line")
    c.add_argument("--batch-size", type=positive_int, default=64)
    c.add_argument("--bf16", action="store_true", help="compute in bf16 (faster where native, slightly different)")
    c.add_argument("--json", action="store_true", help=json_help)
    device_option(c)
    c.set_defaults(fn=fn)


def add_classify(sub) -> None:
    _texts_command(
        sub,
        "classify",
        "label texts with a classifier checkpoint",
        "texts",
        "print one JSON object with every label's probability",
        classify,
    )


def classify(args: argparse.Namespace) -> int:
    """The most probable label of each input text, with every label's probability."""
    from ..backend import decoding_precision
    from ..classify import classify_texts

    ckpt = load(args, "classification")
    labels = ckpt.meta.get("labels") or [str(i) for i in range(ckpt.config.num_labels)]
    texts = read_inputs(args.text, args.input)
    with decoding_precision(ckpt.model, args.bf16):
        probs = classify_texts(ckpt.model, ckpt.src_tokenizer, texts, batch_size=args.batch_size)
    rows = [
        {"label": labels[int(p.argmax())], "probabilities": dict(zip(labels, [round(float(x), 6) for x in p]))}
        for p in probs
    ]
    if args.json:
        print(json.dumps({"predictions": rows}))
    else:
        for row in rows:
            print(f"{row['label']}\t{row['probabilities'][row['label']]:.4f}")
    return 0


def add_embed(sub) -> None:
    _texts_command(
        sub,
        "embed",
        "sentence embeddings from an encoder-only checkpoint",
        "sentences",
        'print {"embeddings": [[...], ...], "dim": N}',
        embed,
    )


def embed(args: argparse.Namespace) -> int:
    """One vector per input sentence, pooled (and normalised) as the checkpoint says."""
    from ..backend import decoding_precision
    from ..classify import embed_texts

    ckpt = load(args, "embedding")
    texts = read_inputs(args.text, args.input)
    with decoding_precision(ckpt.model, args.bf16):
        vectors = embed_texts(ckpt.model, ckpt.src_tokenizer, texts, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"embeddings": vectors.tolist(), "dim": vectors.size(1)}))
    else:
        for v in vectors.tolist():
            print(" ".join(f"{x:.6f}" for x in v))
    return 0
