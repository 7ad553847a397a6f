"""The `transformer` command: argument parsing, progress and exit codes over the library.

Exit status: 0 success; 2 a user mistake (one line on stderr, no traceback); 130/143 training interrupted by
Ctrl-C/SIGTERM after saving a resumable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import TransformerError

log = logging.getLogger("transformer")


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _is_main_process() -> bool:
    """False on every torchrun process but rank 0: only rank 0 shows progress and prints results."""
    import os

    return os.environ.get("RANK", "0") == "0"


class _StderrHandler(logging.Handler):
    """Log lines to whatever sys.stderr is at the time (so redirection and test capture work)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _setup_logging(quiet: bool) -> None:
    quiet = quiet or not _is_main_process()
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


class _ProgressBar:
    """A tqdm bar fed by the trainer's progress callback: loss, learning rate, tokens/s, ETA."""

    def __init__(self, total: Optional[int], enabled: bool, max_minutes: float = 0.0) -> None:
        self.bar = None
        self.max_minutes = max_minutes
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, info: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.update(info["step"] - self.bar.n)
        post = {"loss": f"{info['loss']:.3f}", "lr": f"{info['lr']:.2e}", "tok/s": f"{info['tokens_per_s']:.0f}"}
        if self.max_minutes:
            post["left"] = f"{max(0.0, self.max_minutes - info['minutes']):.1f}min"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _number(kind: type, minimum: float, what: str):
    """An argparse type: a number of `kind` that is at least `minimum`."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse


_positive_int = _number(int, 1, "an integer")
_nonneg_float = _number(float, 0, "a number")


def _read_inputs(texts: Sequence[str], input_file: Optional[str]) -> list[str]:
    if texts and input_file:
        raise TransformerError("give sentences as arguments or with --input, not both")
    if input_file:
        from .data import read_lines

        return read_lines(input_file, "input file")
    if texts:
        return list(texts)
    return [line.rstrip("\r\n") for line in sys.stdin]


def _run_trainer(run, out: Path, resume: bool, quiet: bool, overwrite: bool = False):
    from .train import Trainer

    trainer = Trainer(run, out, resume=resume, overwrite=overwrite)
    t = run.train
    bar = _ProgressBar(t.max_steps or None, enabled=not quiet and _is_main_process(), max_minutes=t.max_minutes)
    trainer.progress = bar
    try:
        started = time.perf_counter()
        record = trainer.train()
        seconds = time.perf_counter() - started
    finally:
        bar.close()
    return trainer, record, seconds


# ----------------------------------------------------------------------------------------------------------
# Commands


_DEMO_TEST = 500  # held-out strings the demo tests on


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a small model on the built-in task (reverse letter strings), test it on held-out strings."""
    from .checkpoint import load_checkpoint
    from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from .evaluate import exact_match
    from .generate import translate_texts
    from .tasks import build_task

    # Sized to solve the task within its budget on any 2-core CPU, AVX2 laptops included: post-norm (the
    # paper's), no dropout (the data is unlimited), a cosine schedule that anneals to zero at the last step, fp32
    # (at this size bf16 saves nothing). Validation picks `best` on the first 200 held-out strings; the test is
    # on the other 500.
    run = RunConfig(
        model=ModelConfig(d_model=128, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=256, dropout=0.0,
                          tie_embeddings="all", src_vocab_size=30, tgt_vocab_size=30),
        data=DataConfig(task="synthetic", synthetic_task=args.task, synthetic_train_size=50000,
                        synthetic_val_size=200 + _DEMO_TEST, max_len=32),
        train=TrainConfig(seed=args.seed, max_tokens=1024, lr=3e-3, warmup_steps=100, schedule="cosine",
                          label_smoothing=0.0, max_steps=args.steps, max_minutes=args.max_minutes, eval_every=250,
                          eval_bleu_sentences=200, log_every=10, precision="fp32", device=args.device),
    )
    out = Path(args.out)
    # a fresh demo replaces an earlier demo's run (that is what running it twice means); any other run only
    # with --overwrite, and a directory that holds no run never
    overwrite = args.overwrite or _is_demo_run(out)
    if not args.json:
        print(f"Training a Transformer to {args.task} letter strings (held-out strings never seen in training)...",
              file=sys.stderr)
    trainer, _, seconds = _run_trainer(run, out, resume=False, quiet=args.json, overwrite=overwrite)
    ckpt = load_checkpoint(out / "best", device=trainer.device)
    task = build_task(run, ckpt.tokenizers)
    test_src, test_tgt = task.val_src[-_DEMO_TEST:], task.val_tgt[-_DEMO_TEST:]  # not the validation strings
    hyps = translate_texts(ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, test_src)
    score = exact_match(hyps, test_tgt)
    result = {"task": args.task, "exact_match": round(score, 4), "held_out": len(test_src),
              "train_seconds": round(seconds, 1), "steps": trainer.position.step, "checkpoint": str(out / "best"),
              "examples": [{"input": s, "output": h, "expected": r} for s, h, r in
                           list(zip(test_src, hyps, test_tgt))[:5]]}
    if args.json:
        print(json.dumps(result))
    else:
        for ex in result["examples"]:
            mark = "ok" if ex["output"] == ex["expected"] else "WRONG"
            print(f"  {ex['input']:>18}  ->  {ex['output']:<18} [{mark}]")
        print(f"exact match on {len(test_src)} held-out strings: {score:.3f}  "
              f"(trained {trainer.position.step} steps in {seconds:.0f} s)")
        print(f"checkpoint: {out / 'best'}    try: transformer translate {out / 'best'} stressed")
    return 0


def _is_demo_run(out: Path) -> bool:
    """Does `out` hold a run of `transformer demo` (the built-in task)?"""
    try:
        return json.loads((out / "run_config.json").read_text(encoding="utf-8"))["data"]["task"] == "synthetic"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cmd_train(args: argparse.Namespace) -> int:
    from .config import RunConfig, apply_overrides, from_dict, load_run_config
    from .rundir import read_run_config

    if args.resume:
        out = Path(args.resume)
        run = read_run_config(out)
        if args.config is not None:
            log.info("--resume: using the recipe saved in %s (ignoring %s)", out, args.config)
        if args.set:
            run = from_dict(RunConfig, apply_overrides(run.to_dict(), args.set))
    else:
        if args.config is None:
            raise TransformerError("give a config file (e.g. configs/multi30k-en-de.yaml) or --resume RUN_DIR")
        run = load_run_config(args.config, args.set)
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        if (out / "run_config.json").exists() and not args.overwrite:
            raise TransformerError(f"{out}: already holds a training run; resume it with --resume {out}, start it "
                                   "afresh with --overwrite, or choose another --out")
    if args.max_minutes is not None:
        run.train.max_minutes = args.max_minutes
    if args.device is not None:
        run.train.device = args.device
        run.train.__post_init__()
    if args.init_from is not None:
        run.model.init_from = args.init_from
    if args.fsdp:
        run.train.fsdp = True
    _, record, seconds = _run_trainer(run, out, resume=bool(args.resume), quiet=args.json, overwrite=args.overwrite)
    result = {"run_dir": str(out), "seconds": round(seconds, 1), **record}
    if not _is_main_process():
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        figures = ", ".join(f"{k}={v}" for k, v in record.items())
        print(f"done: {figures}\nrun directory: {out} (best checkpoint: {out / 'best'})")
    return 0


def _load(args: argparse.Namespace, task: str):
    """The checkpoint named on the command line, on the device that --device names."""
    from .backend import resolve_device
    from .checkpoint import load_checkpoint

    return load_checkpoint(args.checkpoint, device=resolve_device(args.device), task=task)


def _decoding(ckpt, args: argparse.Namespace):
    """The precision to decode in: fp32, --bf16 (bf16 autocast, or bf16 weights on a GPU) or --int8 (int8
    weights on the CPU)."""
    import contextlib

    from .backend import decoding_precision
    from .cpu.linear import int8_weights

    if getattr(args, "int8", False):
        if args.bf16:
            raise TransformerError("choose one of --bf16 and --int8")
        if next(ckpt.model.parameters()).device.type != "cpu":
            raise TransformerError("--int8 decodes on the CPU (use --device cpu); on a GPU use --bf16")
        return int8_weights(ckpt.model)
    return decoding_precision(ckpt.model, args.bf16) if args.bf16 else contextlib.nullcontext()


def _max_src_len(ckpt) -> Optional[int]:
    cfg = ckpt.config
    return cfg.max_positions if cfg.positional == "learned" else None


def cmd_translate(args: argparse.Namespace) -> int:
    from .generate import translate_texts

    ckpt = _load(args, "translation")
    texts = _read_inputs(args.text, args.input)
    with _decoding(ckpt, args):
        outputs = translate_texts(
            ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, [t.strip() for t in texts], beam_size=args.beam,
            batch_size=args.batch_size, length_penalty=args.length_penalty, max_len_a=args.max_len_a,
            max_len_b=args.max_len_b, max_src_len=_max_src_len(ckpt),
        )
    for line in outputs:
        print(line)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import read_config
    from .data import read_parallel
    from .evaluate import bleu_chrf
    from .generate import translate_texts

    if read_config(args.checkpoint)["task"] == "classification":
        return _evaluate_classifier(args)
    if not (args.src and args.ref):
        raise TransformerError("evaluate a translator with --src FILE --ref FILE (a classifier: --data FILE.tsv)")
    ckpt = _load(args, "translation")
    src, ref = read_parallel(args.src, args.ref, None, "evaluation")
    start = time.perf_counter()
    with _decoding(ckpt, args):
        hyps = translate_texts(
            ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, src, beam_size=args.beam, batch_size=args.batch_size,
            length_penalty=args.length_penalty, max_src_len=_max_src_len(ckpt),
        )
    seconds = time.perf_counter() - start
    scores = bleu_chrf(hyps, ref)
    result = {**scores.as_dict(), "beam": args.beam, "bf16": args.bf16, "int8": args.int8, "seconds": round(seconds, 2)}
    if args.output:
        from .files import write_text_atomic

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
    from .backend import decoding_precision
    from .data import read_labelled
    from .encoding import classify_texts
    from .tasks import classification_scores

    if not args.data:
        raise TransformerError("evaluate a classifier with --data FILE.tsv ('label<TAB>text' lines)")
    ckpt = _load(args, "classification")
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
        print(f"accuracy = {scores['accuracy']:.4f}  macro-F1 = {scores['macro_f1']:.4f}  ({len(texts)} examples, "
              f"{seconds:.1f} s)")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """The most probable label of each input text, with every label's probability."""
    from .backend import decoding_precision
    from .encoding import classify_texts

    ckpt = _load(args, "classification")
    labels = ckpt.meta.get("labels") or [str(i) for i in range(ckpt.config.num_labels)]
    texts = _read_inputs(args.text, args.input)
    with decoding_precision(ckpt.model, args.bf16):
        probs = classify_texts(ckpt.model, ckpt.src_tokenizer, texts, batch_size=args.batch_size)
    rows = [{"label": labels[int(p.argmax())], "probabilities": dict(zip(labels, [round(float(x), 6) for x in p]))}
            for p in probs]
    if args.json:
        print(json.dumps({"predictions": rows}))
    else:
        for row in rows:
            print(f"{row['label']}\t{row['probabilities'][row['label']]:.4f}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Prepare a recipe's training corpus (what `train` does first): tokenizer, memory-mapped token arrays."""
    from .config import load_run_config
    from .prepare import prepare

    prepared = prepare(load_run_config(args.config, args.set))
    result = {"directory": str(prepared.directory), **{k: v for k, v in prepared.stats.items() if k != "tokenizers"}}
    print(json.dumps(result) if args.json else f"prepared corpus: {prepared.directory}\n"
          + ", ".join(f"{k}={v}" for k, v in result.items() if k != "directory"))
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from .checkpoint import average_checkpoints
    from .rundir import step_checkpoints

    run_dir = Path(args.run_dir)
    steps = step_checkpoints(run_dir)
    if not steps:
        raise TransformerError(f"{run_dir}: no checkpoints/step-* directories to average")
    chosen = steps[-args.last :]
    out = Path(args.out) if args.out else run_dir / "averaged"
    average_checkpoints(chosen, out, overwrite=args.overwrite)
    print(f"averaged {len(chosen)} checkpoints ({chosen[0].name} .. {chosen[-1].name}) into {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import TextStream, check_sampling, sample

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    ckpt = _load(args, "lm")
    tok = ckpt.tgt_tokenizer
    # with no prompt, start from a newline (what the text's lines follow), or <s> if the vocabulary has none
    ids = tok.encode(args.prompt or "\n") or [ckpt.config.bos_id]
    device = next(ckpt.model.parameters()).device
    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    context = ckpt.meta.get("run", {}).get("data", {}).get("block_size")
    gen = torch.Generator().manual_seed(args.seed)
    for n in range(args.num_samples):
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        stream = TextStream(tok, ids)
        for tokens in sample(ckpt.model, prompt[n : n + 1], args.max_new_tokens, args.temperature, args.top_k,
                             args.top_p, gen, context):
            sys.stdout.write(stream.push(int(tokens[0])))
            sys.stdout.flush()
        sys.stdout.write("\n" if n == args.num_samples - 1 else "\n---\n")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """A Hugging Face model directory -> a checkpoint of this package."""
    from .checkpoint import save_checkpoint
    from .interop import from_pretrained

    ckpt = from_pretrained(args.hf_dir)
    out = save_checkpoint(args.out, ckpt.model, ckpt.task, ckpt.tokenizers, ckpt.meta, overwrite=args.overwrite)
    cfg = ckpt.config
    print(f"imported a {ckpt.meta['hf_model_type']} model ({cfg.arch}, {cfg.d_model} wide, "
          f"{cfg.n_encoder_layers if cfg.arch != 'decoder-only' else cfg.n_decoder_layers} layers) into {out} "
          f"as a '{ckpt.task}' checkpoint")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .interop import export_hf

    ckpt = load_checkpoint(args.checkpoint)
    if args.to == "ct2":
        from .interop.ctranslate2 import export_ct2

        out = export_ct2(ckpt, args.out, quantization=args.quantization, overwrite=args.overwrite)
        print(f"wrote a CTranslate2 model directory to {out}")
        return 0
    if args.quantization:
        raise TransformerError("--quantization applies to --to ct2 only")
    out = export_hf(ckpt, args.out, overwrite=args.overwrite)
    print(f"wrote a Hugging Face model directory to {out}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """One vector per input sentence, pooled (and normalised) as the checkpoint says."""
    from .backend import decoding_precision
    from .encoding import embed_texts

    ckpt = _load(args, "embedding")
    texts = _read_inputs(args.text, args.input)
    with decoding_precision(ckpt.model, args.bf16):
        vectors = embed_texts(ckpt.model, ckpt.src_tokenizer, texts, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"embeddings": vectors.tolist(), "dim": vectors.size(1)}))
    else:
        for v in vectors.tolist():
            print(" ".join(f"{x:.6f}" for x in v))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import Limits, serve

    limits = Limits(args.max_texts, args.max_text_chars, args.max_body_bytes, args.max_beam, args.max_new_tokens)
    serve(args.checkpoint, args.host, args.port, args.device, args.bf16, limits, args.max_batch_tokens,
          args.max_wait_ms, args.max_batch, args.int8)
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from .viz import attention_maps, plot_attention

    ckpt = _load(args, "translation")
    maps = attention_maps(ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, args.source, args.target)
    written = []
    if args.out or not args.html:
        written.append(plot_attention(maps, args.out or "attention.png",
                                      kinds=args.kind or ("encoder", "decoder", "cross"), layer=args.layer, head=args.head))
    if args.html:
        from .viz import attention_html

        written.append(attention_html(maps, args.html))
    print(f"wrote {', '.join(map(str, written))}  (source: {' '.join(maps.src_tokens)} | "
          f"target: {' '.join(maps.tgt_tokens[1:])})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .viz import plot_curves

    out = plot_curves(args.run_dir, args.out, title=args.title)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Parser


def _overwrite_option(q: argparse.ArgumentParser, what: str) -> None:
    q.add_argument("--overwrite", action="store_true",
                   help=f"replace {what}; a directory holding anything else is never written")


def _device_option(q: argparse.ArgumentParser) -> None:
    q.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")


def _add_training_commands(sub) -> None:
    d = sub.add_parser("demo", help="train and test a small model on a built-in task (no downloads)")
    d.add_argument("--out", default="demo-run", help="run directory (default: demo-run)")
    d.add_argument("--task", default="reverse", choices=["reverse", "sort", "copy"])
    d.add_argument("--steps", type=_positive_int, default=1600, help="training steps (default 1600)")
    d.add_argument("--max-minutes", type=_nonneg_float, default=2.75, help="time budget (default 2.75)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    _overwrite_option(d, "a run in --out that is not an earlier demo's")
    _device_option(d)
    d.set_defaults(fn=cmd_demo)

    pr = sub.add_parser("prepare", help="tokenise a recipe's training corpus once, into memory-mapped arrays")
    pr.add_argument("config", help="YAML recipe")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.set_defaults(fn=cmd_prepare)

    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/multi30k-en-de.yaml")
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, e.g. train.lr=5e-4")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    t.add_argument("--max-minutes", type=_nonneg_float, help="time budget in minutes (overrides train.max_minutes)")
    t.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters with FSDP2 (train.fsdp)")
    t.add_argument("--json", action="store_true", help="print one JSON object at the end (no progress bar)")
    t.add_argument("--device", help="auto (the GPU when there is one), cpu, cuda or cuda:N (train.device)")
    t.add_argument("--init-from", metavar="CKPT", help="start from this checkpoint's model (model.init_from)")
    _overwrite_option(t, "the run in --out (its checkpoints, metrics and run_config.json; other files are kept)")
    t.set_defaults(fn=cmd_train)



def _add_translation_commands(sub) -> None:
    def decoding_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--beam", type=_positive_int, default=1, help="beam size (1 = greedy)")
        q.add_argument("--batch-size", type=_positive_int, default=64, help="sentences per batch")
        q.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length**LP")
        q.add_argument("--bf16", action="store_true", help="decode under bf16 autocast (faster, slightly different)")
        q.add_argument("--int8", action="store_true", help="decode with int8 weights on the CPU (faster, slightly "
                                                           "different)")
        _device_option(q)

    tr = sub.add_parser("translate", help="translate sentences with a checkpoint")
    tr.add_argument("checkpoint", help="checkpoint directory")
    tr.add_argument("text", nargs="*", help="sentences (default: read lines from stdin)")
    tr.add_argument("--input", help="read sentences from this file, one per line")
    tr.add_argument("--max-len-a", type=_nonneg_float, default=1.5, help="max output tokens = a * source tokens + b")
    tr.add_argument("--max-len-b", type=int, default=10)
    decoding_options(tr)
    tr.set_defaults(fn=cmd_translate)

    e = sub.add_parser("evaluate", help="BLEU and chrF of a translator (sacreBLEU), or a classifier's accuracy")
    e.add_argument("checkpoint")
    e.add_argument("--src", help="source sentences, one per line")
    e.add_argument("--ref", help="reference translations, line-aligned with --src")
    e.add_argument("--data", help="a classifier's test file of 'label<TAB>text' lines")
    e.add_argument("--output", help="also write the translations to this file")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    decoding_options(e)
    e.set_defaults(fn=cmd_evaluate)



def _add_pretrained_commands(sub) -> None:
    im = sub.add_parser("import", help="turn a Hugging Face model directory (BERT, Marian, GPT-2) into a checkpoint")
    im.add_argument("hf_dir", help="a local directory with config.json, model.safetensors and tokenizer files")
    im.add_argument("--out", required=True, help="checkpoint directory to write")
    _overwrite_option(im, "a checkpoint in --out")
    im.set_defaults(fn=cmd_import)
    ex = sub.add_parser("export", help="write a checkpoint in another library's format")
    ex.add_argument("checkpoint")
    ex.add_argument("--to", choices=["hf", "ct2"], default="hf",
                    help="hf: a Hugging Face transformers directory; ct2: a CTranslate2 model directory")
    ex.add_argument("out", help="directory to write")
    ex.add_argument("--quantization", choices=["int8", "int8_float32", "int16", "float16", "bfloat16"],
                    help="ct2: store the weights in this type (default float32)")
    _overwrite_option(ex, "a model of the same format in OUT")
    ex.set_defaults(fn=cmd_export)
    _add_texts_command(sub, "classify", "label texts with a classifier checkpoint", "texts",
                       "print one JSON object with every label's probability", cmd_classify)
    _add_texts_command(sub, "embed", "sentence embeddings from an encoder-only checkpoint", "sentences",
                       'print {"embeddings": [[...], ...], "dim": N}', cmd_embed)


def _add_texts_command(sub, name: str, help: str, what: str, json_help: str, fn) -> None:
    """`classify` and `embed`: an encoder-only checkpoint over texts from the arguments, a file or stdin."""
    c = sub.add_parser(name, help=help)
    c.add_argument("checkpoint")
    c.add_argument("text", nargs="*", help=f"{what} (default: read lines from stdin)")
    c.add_argument("--input", help=f"read {what} from this file, one per line")
    c.add_argument("--batch-size", type=_positive_int, default=64)
    c.add_argument("--bf16", action="store_true", help="compute in bf16 (faster where native, slightly different)")
    c.add_argument("--json", action="store_true", help=json_help)
    _device_option(c)
    c.set_defaults(fn=fn)


def _add_serve_command(sub) -> None:
    sv = sub.add_parser("serve", help="serve a checkpoint over HTTP (JSON API, dynamic batching, a page at /)")
    sv.add_argument("checkpoint")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_positive_int, default=8000)
    sv.add_argument("--max-batch-tokens", type=_positive_int, default=4096,
                    help="decode requests together up to this many source tokens (default 4096)")
    sv.add_argument("--max-wait-ms", type=_nonneg_float, default=25.0,
                    help="wait at most this long for more requests to join a batch (default 25)")
    sv.add_argument("--max-batch", type=_positive_int, default=64, help="texts per batch (1: no batching)")
    sv.add_argument("--max-texts", type=_positive_int, default=64, help="texts per request (default 64)")
    sv.add_argument("--max-text-chars", type=_positive_int, default=2000, help="characters per text (default 2000)")
    sv.add_argument("--max-body-bytes", type=_positive_int, default=1_000_000, help="request body (default 1 MB)")
    sv.add_argument("--max-beam", type=_positive_int, default=16)
    sv.add_argument("--max-new-tokens", type=_positive_int, default=512)
    sv.add_argument("--bf16", action="store_true", help="decode in bf16 (where it is native)")
    sv.add_argument("--int8", action="store_true", help="decode with int8 weights on the CPU (faster, slightly "
                    "different results)")
    _device_option(sv)
    sv.set_defaults(fn=cmd_serve)


def _add_other_commands(sub) -> None:
    a = sub.add_parser("average", help="average the weights of a run's last checkpoints")
    a.add_argument("run_dir")
    a.add_argument("--last", type=_positive_int, default=5, help="how many of the newest checkpoints (default 5)")
    a.add_argument("--out", help="output checkpoint directory (default: RUN_DIR/averaged)")
    _overwrite_option(a, "a checkpoint in --out")
    a.set_defaults(fn=cmd_average)

    g = sub.add_parser("generate", help="sample text from a language-model checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most probable tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with probability >= p")
    g.add_argument("--num-samples", type=_positive_int, default=1)
    g.add_argument("--seed", type=int, default=0)
    _device_option(g)
    g.set_defaults(fn=cmd_generate)

    at = sub.add_parser("attention", help="draw a checkpoint's attention weights for a sentence")
    at.add_argument("checkpoint")
    at.add_argument("source", help="source sentence")
    at.add_argument("--target", help="teacher-force this translation (default: the model's own greedy output)")
    at.add_argument("--out", help="PNG file (default attention.png, unless only --html is given)")
    at.add_argument("--html", help="also write an interactive, self-contained HTML page")
    at.add_argument("--kind", action="append", choices=["encoder", "decoder", "cross"],
                    help="which attention (repeatable; default all three)")
    at.add_argument("--layer", type=_positive_int, help="one layer (1-based), drawn large with --head")
    at.add_argument("--head", type=_positive_int, help="one head (1-based)")
    _device_option(at)
    at.set_defaults(fn=cmd_attention)

    pl = sub.add_parser("plot", help="draw training curves from a run's metrics.jsonl")
    pl.add_argument("run_dir", help="run directory (or its metrics.jsonl)")
    pl.add_argument("--out", default="curves.png", help="PNG file to write (default curves.png)")
    pl.add_argument("--title", help="a title over the plots")
    pl.set_defaults(fn=cmd_plot)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transformer", description="Train, run and inspect Transformer models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_commands(sub)
    _add_translation_commands(sub)
    _add_pretrained_commands(sub)
    _add_serve_command(sub)
    _add_other_commands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # sentences may come after options too: `translate CKPT --beam 5 "a sentence"`
    if extra and isinstance(getattr(args, "text", None), list) and not any(e.startswith("-") for e in extra):
        args.text += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(quiet=getattr(args, "json", False))
    from .cpu import memory
    from .train import TrainingInterrupted

    memory.tune_allocator()  # this process is ours: keep freed memory for reuse (decoding allocates every step)

    try:
        return args.fn(args)
    except TrainingInterrupted as e:
        print(f"transformer: {e}", file=sys.stderr)
        return e.exit_code
    except TransformerError as e:
        print(f"transformer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transformer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # the machine's refusal (permissions, a full disk), not a bug: say which file
        where = f"{e.filename}: " if e.filename else ""
        print(f"transformer: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
