"""python -m bench [WORKLOAD ...] [--smoke] [--rounds N] [--json FILE]

Runs each workload's contenders interleaved in this one process and prints a table of medians and ratios
(peer time / our time: above 1 means we are faster), then writes the same figures as JSON.
Workloads: train-small, train-base (fp32 and bf16 each), greedy (fp32 and bf16), beam, lm, mfu, memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from . import workloads as W
from .harness import compare, ratio

ALL = ["train-small", "train-base", "greedy", "beam", "lm", "mfu", "memory"]

# Targets from the issue: (workload row, peer) -> minimum ratio
TARGETS = {
    ("train small fp32", "nn.Transformer"): 1.25, ("train small bf16", "nn.Transformer"): 1.25,
    ("train base fp32", "nn.Transformer"): 1.25, ("train base bf16", "nn.Transformer"): 1.25,
    ("train small fp32", "HF Marian"): 1.0, ("train small bf16", "HF Marian"): 1.0,
    ("train base fp32", "HF Marian"): 1.0, ("train base bf16", "HF Marian"): 1.0,
    ("greedy base", "HF generate"): 1.5, ("greedy base", "naive recompute"): 8.0,
    ("beam5 base", "HF generate"): 1.5, ("lm step", "HF GPT-2"): 1.0, ("train base bf16", "ours fp32"): 1.5,
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("workloads", nargs="*", help=f"some of {', '.join(ALL)} (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round: checks that the suite runs")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default="bench/results.json", help="where to write the figures")
    args = p.parse_args(argv)
    chosen = args.workloads or ALL
    unknown = set(chosen) - set(ALL)
    if unknown:
        p.error(f"unknown workload {sorted(unknown)[0]!r}; choose from {', '.join(ALL)}")
    rounds, warmup = (1, 1) if args.smoke else (args.rounds, 2)
    hf = W.have_hf()
    small, base = (W.TINY, W.TINY) if args.smoke else (W.SMALL, W.BASE)
    rows: list[dict] = []

    def record(name: str, result: dict, unit_work: float, unit: str, ours: str = "ours") -> None:
        for peer in result:
            row = {"workload": name, "contender": peer, "median_s": round(result[peer]["median_s"], 5),
                   f"{unit}": round(unit_work / result[peer]["median_s"], 1)}
            if peer != ours:
                row["ratio"] = round(ratio(result, ours, peer), 3)
                target = TARGETS.get((name, peer))
                if target is not None:
                    row["target"] = target
                    row["met"] = row["ratio"] >= target
            rows.append(row)
        print_row_block(rows[-len(result):])

    from transformer import backend

    # bf16 only where the CPU does bf16 arithmetic: elsewhere it is emulated, and every contender's bf16 step
    # took ~20x its fp32 time on an AVX2 CPU (rows of that are noise about emulation, not about the libraries)
    bf16_modes = (False, True) if backend.native_bf16_cpu() else (False,)
    print(f"# bench {datetime.date.today()}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"cpu: {cpu_name()} ({backend.cpu_description()})  HF transformers: "
          f"{'yes' if hf else 'not installed (pip install .[bench])'}\n# our CPU paths: {backend.cpu_paths().describe()}")
    if len(bf16_modes) == 1:
        print("# bf16 rows skipped: this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 would be emulated")
    batch, length = (4, 8) if args.smoke else (32, 32)
    for size_name, size in (("small", small), ("base", base)):
        if f"train-{size_name}" not in chosen:
            continue
        for bf16 in bf16_modes:
            both = bf16 and size_name == "base"  # the bf16 speed-up over our own fp32 is a target too
            res = compare(W.train_contenders(size, bf16, hf, batch, length, with_ours_fp32=both), rounds, warmup)
            record(f"train {size_name} {'bf16' if bf16 else 'fp32'}", res, batch * length, "tokens/s")
    if "greedy" in chosen:
        n, sentences = (8, 4) if args.smoke else (64, 32)
        res = compare(W.decode_contenders(base, n, sentences, 1, hf, naive=True), rounds, warmup)
        record("greedy base", res, sentences * n, "tokens/s")
        if True in bf16_modes:
            res = compare(W.decode_contenders(base, n, sentences, 1, hf, naive=False, bf16=True), rounds, warmup)
            record("greedy base bf16", res, sentences * n, "tokens/s")
    if "beam" in chosen:
        n = 8 if args.smoke else 64
        res = compare(W.decode_contenders(base, n, 2 if args.smoke else 8, 5, hf, naive=False), rounds, warmup)
        record("beam5 base", res, (2 if args.smoke else 8) * n, "tokens/s")
    if "lm" in chosen:
        res = compare(W.lm_contenders(hf, block=16 if args.smoke else 64, batch=2 if args.smoke else 12), rounds, warmup)
        record("lm step", res, (2 * 16) if args.smoke else 12 * 64, "tokens/s")
    if "mfu" in chosen:
        for bf16 in bf16_modes:
            peak = W.matmul_peak(bf16, n=256 if args.smoke else 1024)
            flops = W.step_flops(base, bf16, batch, length)
            step = W.train_contenders(base, bf16, False, batch, length)["ours"]
            res = compare({"ours": step}, rounds, warmup)
            achieved = flops / res["ours"]["median_s"]
            row = {"workload": f"mfu base {'bf16' if bf16 else 'fp32'}", "contender": "ours",
                   "model_tflops": round(achieved / 1e12, 4), "peak_tflops": round(peak / 1e12, 4),
                   "mfu": round(achieved / peak, 3)}
            rows.append(row)
            print_row_block([row])
    if "memory" in chosen:
        for bf16 in bf16_modes:
            contenders = W.train_contenders(base, bf16, hf, batch, length)
            for c in contenders.values():
                c()  # first step allocates the optimizer state: measure a steady one
            block = []
            for name, step in contenders.items():
                row = {"workload": f"memory base {'bf16' if bf16 else 'fp32'}", "contender": name,
                       "peak_mib": round(W.peak_memory(step) / 2**20, 1)}
                rows.append(row)
                block.append(row)
            print_row_block(block)
    meta = {"date": str(datetime.date.today()), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "cpu_kind": backend.cpu_description(), "cpu_paths": backend.cpu_paths().describe(), "python": sys.version.split()[0], "hf": hf, "smoke": args.smoke, "rounds": rounds}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    missed = [r for r in rows if r.get("met") is False]
    print(f"# wrote {args.json}; targets met: {sum(1 for r in rows if r.get('met'))}, missed: {len(missed)}")
    return 0


def print_row_block(rows: list[dict]) -> None:
    for r in rows:
        extra = "  ".join(f"{k}={v}" for k, v in r.items() if k not in ("workload", "contender"))
        print(f"{r['workload']:<18} {r['contender']:<16} {extra}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
