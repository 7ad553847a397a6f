"""python -m bench.lora [--steps N] [--rounds R] [--json FILE]: LoRA against full fine-tuning, and against peft +
transformers, on a ~125M-parameter Llama-shaped model (bench/llm.py's shape) with random weights.

Each contender runs in a process of its own, so that its peak resident memory (ru_maxrss) is its own: the model,
its gradients and optimizer state, the activations of a (batch, length) step. The processes run one after the
other, the contenders alternating over `rounds`; a contender's figure is the median step time over its rounds'
timed steps and its largest peak RSS. Every contender takes the same batch, the same AdamW (torch's fused
kernel, on what trains), bf16 autocast where this CPU has native bf16 (else fp32), and the same LoRA settings:
rank 16, alpha 32, no dropout, on every projection of every layer (q, k, v, o, gate, up, down).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONTENDERS = ["ours LoRA", "peft LoRA", "ours full"]
R, ALPHA = 16, 32.0


def _model(kind: str, hf_dir: Path):
    """(model, loss function of (x, y)) for a contender, its trainable parameters set."""
    import torch.nn.functional as F

    if kind == "peft LoRA":
        import peft
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
        modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = peft.get_peft_model(
            hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=modules)
        )

        def loss(x, y):
            return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten())

        return model, loss
    from transformer.config import LoRAConfig
    from transformer.interop import from_pretrained
    from transformer.lora import apply_lora, trainable_parameters

    model = from_pretrained(hf_dir, dtype="fp32").model
    if kind == "ours LoRA":
        cfg = LoRAConfig(r=R, alpha=ALPHA, dropout=0.0, targets=["all-linear"])
        apply_lora(model, cfg)
        trainable_parameters(model, cfg)
    return model, lambda x, y: model.loss(x, y)


def child(kind: str, hf_dir: Path, steps: int, batch: int, length: int, bf16: bool) -> dict:
    """Run `steps` + 2 warm-up training steps of one contender; its step times and peak RSS."""
    torch.manual_seed(0)
    model, loss_fn = _model(kind, hf_dir)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, 32000, (batch, length), generator=g)
    y = torch.randint(5, 32000, (batch, length), generator=g)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    trained = sum(p.numel() for p in params)
    return {
        "step_s": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trained_parameters": trained,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per contender process")
    p.add_argument("--rounds", type=int, default=2, help="processes per contender, alternating")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--json", default="bench/lora.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.hf_dir), args.steps, args.batch, args.length, args.bf16)))
        return 0
    from transformer import backend

    from . import llm

    bf16 = backend.native_bf16_cpu()
    results: dict[str, list[dict]] = {k: [] for k in CONTENDERS}
    with tempfile.TemporaryDirectory() as d:
        _, hf = llm.models(False)
        hf.save_pretrained(d, safe_serialization=True)
        from tokenizers import Tokenizer, models

        Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(Path(d) / "tokenizer.json"))
        del hf
        for _ in range(args.rounds):
            for kind in CONTENDERS:
                cmd = [
                    sys.executable,
                    "-m",
                    "bench.lora",
                    "--child",
                    kind,
                    "--hf-dir",
                    d,
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                    "--length",
                    str(args.length),
                ] + (["--bf16"] if bf16 else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    base = statistics.median(t for r in results["ours LoRA"] for t in r["step_s"])
    print(
        f"# bench.lora {'bf16' if bf16 else 'fp32'}, batch {args.batch} x {args.length} tokens, "
        f"{args.rounds} processes x {args.steps} steps each, torch {torch.__version__}"
    )
    for kind, runs in results.items():
        step = statistics.median(t for r in runs for t in r["step_s"])
        row = {
            "contender": kind,
            "step_s": round(step, 3),
            "steps_per_s": round(1 / step, 3),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs)),
            "trained_parameters": runs[0]["trained_parameters"],
            "time_over_ours_lora": round(step / base, 3),
        }
        rows.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    Path(args.json).write_text(
        json.dumps({"bf16": bf16, "batch": args.batch, "length": args.length, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
