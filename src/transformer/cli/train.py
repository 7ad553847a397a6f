"""Training commands: `demo`, `prepare`, `train`, `average`."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from ..errors import TransformerError
from .common import device_option, is_main_process, log, nonneg_float, overwrite_option, positive_int, run_trainer

DEMO_TEST = 500  # held-out strings the demo tests on: the last 500 of the recipe's validation strings


def add_demo(sub) -> None:
    d = sub.add_parser("demo", help="train and test a small model on a built-in task (no downloads)")
    d.add_argument("--out", default="demo-run", help="run directory (default: demo-run)")
    d.add_argument("--task", default="reverse", choices=["reverse", "sort", "copy"])
    d.add_argument("--steps", type=positive_int, default=1600, help="training steps (default 1600)")
    d.add_argument("--max-minutes", type=nonneg_float, default=2.75, help="time budget (default 2.75)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    overwrite_option(d, "a run in --out that is not an earlier demo's")
    device_option(d)
    d.set_defaults(fn=demo)


def demo(args: argparse.Namespace) -> int:
    """Train the demo's recipe (configs/demo.yaml: reverse letter strings), test it on held-out strings."""
    from ..checkpoint import load_checkpoint
    from ..config import load_run_config
    from ..generate import translate_texts
    from ..metrics import exact_match
    from ..tasks import build_task

    settings = [
        f"data.synthetic_task={args.task}",
        f"train.seed={args.seed}",
        f"train.max_steps={args.steps}",
        f"train.max_minutes={args.max_minutes}",
        f"train.device={args.device}",
    ]
    with resources.as_file(resources.files("transformer") / "recipes" / "demo.yaml") as recipe:
        run = load_run_config(recipe, settings)
    out = Path(args.out)
    # a fresh demo replaces an earlier demo's run (that is what running it twice means); any other run only
    # with --overwrite, and a directory that holds no run never
    overwrite = args.overwrite or _is_demo_run(out)
    if not args.json:
        print(
            f"Training a Transformer to {args.task} letter strings (held-out strings never seen in training)...",
            file=sys.stderr,
        )
    trainer, _, seconds = run_trainer(run, out, resume=False, quiet=args.json, overwrite=overwrite)
    ckpt = load_checkpoint(out / "best", device=trainer.device)
    task = build_task(run, ckpt.tokenizers)
    test_src, test_tgt = task.val_src[-DEMO_TEST:], task.val_tgt[-DEMO_TEST:]  # not the validation strings
    hyps = translate_texts(ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, test_src)
    score = exact_match(hyps, test_tgt)
    result = {
        "task": args.task,
        "exact_match": round(score, 4),
        "held_out": len(test_src),
        "train_seconds": round(seconds, 1),
        "steps": trainer.position.step,
        "checkpoint": str(out / "best"),
        "examples": [{"input": s, "output": h, "expected": r} for s, h, r in list(zip(test_src, hyps, test_tgt))[:5]],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for ex in result["examples"]:
            mark = "ok" if ex["output"] == ex["expected"] else "WRONG"
            print(f"  {ex['input']:>18}  ->  {ex['output']:<18} [{mark}]")
        print(
            f"exact match on {len(test_src)} held-out strings: {score:.3f}  "
            f"(trained {trainer.position.step} steps in {seconds:.0f} s)"
        )
        print(f"checkpoint: {out / 'best'}    try: transformer translate {out / 'best'} stressed")
    return 0


def _is_demo_run(out: Path) -> bool:
    """Does `out` hold a run of `transformer demo` (the built-in task)?"""
    try:
        return json.loads((out / "run_config.json").read_text(encoding="utf-8"))["data"]["task"] == "synthetic"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def add_prepare(sub) -> None:
    pr = sub.add_parser("prepare", help="tokenise a recipe's training corpus once, into memory-mapped arrays")
    pr.add_argument("config", help="YAML recipe")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.set_defaults(fn=prepare)


def prepare(args: argparse.Namespace) -> int:
    """Prepare a recipe's training corpus (what `train` does first): tokenizer, memory-mapped token arrays."""
    from ..config import load_run_config
    from ..prepare import prepare as prepare_corpus

    prepared = prepare_corpus(load_run_config(args.config, args.set))
    result = {"directory": str(prepared.directory), **{k: v for k, v in prepared.stats.items() if k != "tokenizers"}}
    print(
        json.dumps(result)
        if args.json
        else f"prepared corpus: {prepared.directory}\n"
        + ", ".join(f"{k}={v}" for k, v in result.items() if k != "directory")
    )
    return 0


def add_train(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/multi30k-en-de.yaml")
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, e.g. train.lr=5e-4"
    )
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    t.add_argument("--max-minutes", type=nonneg_float, help="time budget in minutes (overrides train.max_minutes)")
    t.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters with FSDP2 (train.fsdp)")
    t.add_argument("--json", action="store_true", help="print one JSON object at the end (no progress bar)")
    t.add_argument("--device", help="auto (the GPU when there is one), cpu, cuda or cuda:N (train.device)")
    t.add_argument("--init-from", metavar="CKPT", help="start from this checkpoint's model (model.init_from)")
    overwrite_option(t, "the run in --out (its checkpoints, metrics and run_config.json; other files are kept)")
    t.set_defaults(fn=train)


def train(args: argparse.Namespace) -> int:
    from ..config import RunConfig, apply_overrides, from_dict, load_run_config
    from ..rundir import read_run_config

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
            raise TransformerError(
                f"{out}: already holds a training run; resume it with --resume {out}, start it "
                "afresh with --overwrite, or choose another --out"
            )
    if args.max_minutes is not None:
        run.train.max_minutes = args.max_minutes
    if args.device is not None:
        run.train.device = args.device
        run.train.__post_init__()
    if args.init_from is not None:
        run.model.init_from = args.init_from
    if args.fsdp:
        run.train.fsdp = True
    _, record, seconds = run_trainer(run, out, resume=bool(args.resume), quiet=args.json, overwrite=args.overwrite)
    result = {"run_dir": str(out), "seconds": round(seconds, 1), **record}
    if not is_main_process():
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        figures = ", ".join(f"{k}={v}" for k, v in record.items())
        print(f"done: {figures}\nrun directory: {out} (best checkpoint: {out / 'best'})")
    return 0


def add_average(sub) -> None:
    a = sub.add_parser("average", help="average the weights of a run's last checkpoints")
    a.add_argument("run_dir")
    a.add_argument("--last", type=positive_int, default=5, help="how many of the newest checkpoints (default 5)")
    a.add_argument("--out", help="output checkpoint directory (default: RUN_DIR/averaged)")
    overwrite_option(a, "a checkpoint in --out")
    a.set_defaults(fn=average)


def average(args: argparse.Namespace) -> int:
    from ..checkpoint import average_checkpoints
    from ..rundir import step_checkpoints

    run_dir = Path(args.run_dir)
    steps = step_checkpoints(run_dir)
    if not steps:
        raise TransformerError(f"{run_dir}: no checkpoints/step-* directories to average")
    chosen = steps[-args.last :]
    out = Path(args.out) if args.out else run_dir / "averaged"
    average_checkpoints(chosen, out, overwrite=args.overwrite)
    print(f"averaged {len(chosen)} checkpoints ({chosen[0].name} .. {chosen[-1].name}) into {out}")
    return 0
