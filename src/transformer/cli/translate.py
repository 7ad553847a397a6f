"""Translation commands: `translate` and `evaluate` (BLEU and chrF of a translator, or a classifier's accuracy)."""

from __future__ import annotations

import argparse
import json
import time

from ..errors import TransformerError
from .common import decoding, decoding_options, decoding_settings, load, nonneg_float, read_inputs


def add_translate(sub) -> None:
    tr = sub.add_parser("translate", help="translate sentences with a checkpoint")
    tr.add_argument("checkpoint", help="checkpoint directory")
    tr.add_argument("text", nargs="*", help="sentences (default: read lines from stdin)")
    tr.add_argument("--input", help="read sentences from this file, one per line")
    tr.add_argument("--max-len-a", type=nonneg_float, default=1.5, help="max output tokens = a * source tokens + b")
    tr.add_argument("--max-len-b", type=int, default=10)
    decoding_options(tr)
    tr.set_defaults(fn=translate)


def translate(args: argparse.Namespace) -> int:
    from ..generate import translate_texts

    ckpt = load(args, "translation")
    texts = read_inputs(args.text, args.input)
    settings = decoding_settings(args)
    with decoding(ckpt, args):
        outputs = translate_texts(
            ckpt.model,
            ckpt.src_tokenizer,
            ckpt.tgt_tokenizer,
            [t.strip() for t in texts],
            settings,
            batch_size=args.batch_size,
        )
    for line in outputs:
        print(line)
    return 0


def add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="BLEU and chrF of a translator (sacreBLEU), or a classifier's accuracy")
    e.add_argument("checkpoint")
    e.add_argument("--src", help="source sentences, one per line")
    e.add_argument("--ref", help="reference translations, line-aligned with --src")
    e.add_argument("--data", help="a classifier's test file of 'label<TAB>text' lines")
    e.add_argument("--output", help="also write the translations to this file")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    decoding_options(e)
    e.set_defaults(fn=evaluate)


def evaluate(args: argparse.Namespace) -> int:
    from ..checkpoint import read_config
    from ..data import read_parallel
    from ..generate import translate_texts
    from ..metrics import bleu_chrf

    if read_config(args.checkpoint)["task"] == "classification":
        return _evaluate_classifier(args)
    if not (args.src and args.ref):
        raise TransformerError("evaluate a translator with --src FILE --ref FILE (a classifier: --data FILE.tsv)")
    ckpt = load(args, "translation")
    src, ref = read_parallel(args.src, args.ref, None, "evaluation")
    settings = decoding_settings(args)
    start = time.perf_counter()
    with decoding(ckpt, args):
        hyps = translate_texts(
            ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, src, settings, batch_size=args.batch_size
        )
    seconds = time.perf_counter() - start
    scores = bleu_chrf(hyps, ref)
    result = {**scores.as_dict(), "beam": args.beam, "bf16": args.bf16, "int8": args.int8, "seconds": round(seconds, 2)}
    if args.output:
        from ..files import write_text_atomic

        write_text_atomic(args.output, "\n".join(hyps) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"BLEU = {scores.bleu:.2f}  ({scores.bleu_signature})")
        print(f"chrF = {scores.chrf:.2f}  ({scores.chrf_signature})")
        print(f"{scores.sentences} sentences, beam {args.beam}, {seconds:.1f} s")
    return 0


def _evaluate_classifier(args: argparse.Namespace) -> int:
    """Accuracy and macro-F1 of a classifier on a `label<TAB>text` file."""
    from ..backend import decoding_precision
    from ..classify import classify_texts
    from ..data import read_labelled
    from ..tasks import classification_scores

    if not args.data:
        raise TransformerError("evaluate a classifier with --data FILE.tsv ('label<TAB>text' lines)")
    ckpt = load(args, "classification")
    labels = ckpt.meta.get("labels") or [str(i) for i in range(ckpt.config.num_labels)]
    gold, texts = read_labelled(args.data, "evaluation file", known=labels)
    start = time.perf_counter()
    with decoding_precision(ckpt.model, args.bf16):
        probs = classify_texts(ckpt.model, ckpt.src_tokenizer, texts, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    scores = classification_scores(probs.argmax(-1).tolist(), [labels.index(g) for g in gold], len(labels))
    result = {**{k: round(v, 4) for k, v in scores.items()}, "examples": len(texts), "seconds": round(seconds, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"accuracy = {scores['accuracy']:.4f}  macro-F1 = {scores['macro_f1']:.4f}  ({len(texts)} examples, "
            f"{seconds:.1f} s)"
        )
    return 0
