"""python -m bench [WORKLOAD ...] [--smoke] [--rounds N] [--json FILE]

Runs each workload's contenders interleaved in this one process and prints a table of medians and ratios
(peer time / our time: above 1 means we are faster, with the interquartile range of the per-round ratios),
then writes the same figures as JSON. Every contender must do the same work in every round (the same target
tokens, the same number of decoded tokens), or the run fails.
Workloads: train-small, train-base (fp32 and bf16 each), greedy (fp32 and bf16), beam, ct2 (against CTranslate2),
int8 (the int8 products of a decoding step: our int8 kernel against fbgemm), lm, llama (a Llama-shaped model's
prefill and decode against transformers' generate(), batch 1 and 8), mfu, memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

from transformer import backend, cpu

from . import llm
from . import workloads as W
from .harness import AGREE, BUSY, SPREAD, Quiet, compare, ratio, unreliable

ALL = ["train-small", "train-base", "greedy", "beam", "ct2", "int8", "lm", "llama", "mfu", "memory"]

# Targets from the issues: (workload row, peer) -> minimum ratio
TARGETS = {
    ("train small fp32", "nn.Transformer"): 1.25,
    ("train small bf16", "nn.Transformer"): 1.25,
    ("train base fp32", "nn.Transformer"): 1.25,
    ("train base bf16", "nn.Transformer"): 1.25,
    ("train small fp32", "HF Marian"): 1.0,
    ("train small bf16", "HF Marian"): 1.0,
    ("train base fp32", "HF Marian"): 1.0,
    ("train base bf16", "HF Marian"): 1.0,
    ("greedy base", "HF generate"): 1.5,
    ("greedy base", "naive recompute"): 8.0,
    ("beam5 base", "HF generate"): 1.5,
    ("lm step", "HF GPT-2"): 1.0,
    **{
        (f"llama {phase} {precision} b{batch}", "HF generate"): 1.5
        for phase in ("prefill", "decode")
        for precision in ("fp32", "bf16")
        for batch in (1, 8)
    },
    ("train base bf16", "ours fp32"): 1.5,
    **{
        (f"ct2 {kind} {size} {q}", "CTranslate2"): 1.0
        for kind in ("greedy", "beam5")
        for size in ("small", "base")
        for q in ("fp32", "int8")
    },
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Table:
    """The rows of the run: printed as they come, written as JSON at the end."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(
        self,
        name: str,
        result: dict,
        unit_work: float,
        unit: str,
        ours: str = "ours",
        info: Optional[dict[str, dict]] = None,
    ) -> None:
        """One row per contender; `info` adds fields to a contender's row (its threads, ISA, backend)."""
        block = []
        for peer in result:
            r = result[peer]
            row = {
                "workload": name,
                "contender": peer,
                "median_s": round(r["median_s"], 5),
                unit: round(unit_work / r["median_s"], 1),
            }
            if "alone_s" in r:  # the sanity figure: the same calls back to back, the other contenders idle
                row["alone_s"] = round(statistics.median(r["alone_s"]), 5)
            if "settle_s" in r:  # how long the race's threads stayed busy after this contender's calls
                row["spin_after_s"] = round(statistics.median(r["settle_s"]), 4)
            if r.get("others_cores") is not None:
                row["others_cores"] = round(r["others_cores"], 3)
            row.update((info or {}).get(peer, {}))
            if peer != ours:
                median, iqr = ratio(result, ours, peer)
                why = unreliable(result, ours, peer)
                if why:  # no ratio to read, and no target judged on it
                    row["ratio_as_measured"], row["ratio_iqr"], row["unreliable"] = round(median, 3), round(iqr, 3), why
                else:
                    row["ratio"], row["ratio_iqr"] = round(median, 3), round(iqr, 3)
                target = TARGETS.get((name, peer))
                if target is not None:
                    row["target"] = target
                    if not why:
                        row["met"] = row["ratio"] >= target
            block.append(row)
        self.put(block)

    def put(self, block: list[dict]) -> None:
        self.rows += block
        for r in block:
            extra = "  ".join(
                f"{k}={v}"
                for k, v in r.items()
                if k not in ("workload", "contender", "unreliable", "ratio_as_measured")
            )
            if "unreliable" in r:
                extra += f"  ratio=UNRELIABLE ({r['ratio_as_measured']} as measured: {r['unreliable']})"
            print(f"{r['workload']:<26} {r['contender']:<18} {extra}", flush=True)


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
    rounds, warmup = (2, 1) if args.smoke else (args.rounds, 2)
    tuned = cpu.memory.tune_allocator()  # as the CLI does: every contender in this process runs with it
    hf = W.have_hf()
    small, base = (W.TINY, W.TINY) if args.smoke else (W.SMALL, W.BASE)
    # bf16 only where the CPU does bf16 arithmetic: elsewhere it is emulated, and every contender's bf16 step
    # takes many times its fp32 time (rows about emulation, not about the libraries)
    bf16_modes = (False, True) if backend.native_bf16_cpu() else (False,)
    print(
        f"# bench {datetime.date.today()}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
        f"cpu: {cpu_name()} ({backend.cpu_description()})  HF transformers: "
        f"{'yes' if hf else 'not installed (pip install .[bench])'}\n# our CPU paths: {cpu.cpu_paths().describe()}"
        f"\n# allocator keeps freed memory (cpu.memory.tune_allocator): {'yes' if tuned else 'no'}"
        f"\n# int8 products (--int8): {_int8_kind()}"
    )
    ours_info = W.ours_info()
    print(
        f"# ours: {ours_info['threads']} threads, PyTorch kernels {ours_info['isa']}, OpenMP "
        f"{', '.join(ours_info['openmp']) or 'none seen'}, settings {ours_info['env'] or 'none set'} (libgomp "
        "spin-waits 300,000 spins after each parallel region unless OMP_WAIT_POLICY/GOMP_SPINCOUNT say otherwise)"
        f"\n# a ratio is UNRELIABLE where a contender's alone and interleaved medians are over {AGREE}x apart, "
        f"the ratio's IQR is over {SPREAD:.0%} of it, or other processes took over {BUSY} cores during its calls"
    )
    if len(bf16_modes) == 1:
        print("# bf16 rows skipped: this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 would be emulated")
    table = Table()
    batch, length = (4, 8) if args.smoke else (32, 32)
    for size_name, size in (("small", small), ("base", base)):
        if f"train-{size_name}" not in chosen:
            continue
        for bf16 in bf16_modes:
            precision = "bf16" if bf16 else "fp32"
            both = bf16 and size_name == "base"  # the bf16 speed-up over our own fp32 is a target too
            res = compare(W.train_contenders(size, bf16, hf, batch, length, with_ours_fp32=both), rounds, warmup)
            table.add(f"train {size_name} {precision}", res, batch * length, "tokens/s")
            res = compare(W.train_contenders(size, bf16, hf, batch, length, dropouts=W.MARIAN), rounds, warmup)
            table.add(f"train {size_name} {precision} {W.MARIAN}", res, batch * length, "tokens/s")
    if "greedy" in chosen:
        n, sentences = (8, 4) if args.smoke else (64, 32)
        res = compare(W.decode_contenders(base, n, sentences, 1, hf, naive=True), rounds, warmup)
        table.add("greedy base", res, sentences * n, "tokens/s")
        if True in bf16_modes:
            res = compare(W.decode_contenders(base, n, sentences, 1, hf, naive=False, bf16=True), rounds, warmup)
            table.add("greedy base bf16", res, sentences * n, "tokens/s")
    if "beam" in chosen:
        n, sentences = (8, 2) if args.smoke else (64, 8)
        res = compare(W.decode_contenders(base, n, sentences, 5, hf, naive=False), rounds, warmup)
        table.add("beam5 base", res, sentences * n, "tokens/s")
    ct2_info: dict[str, dict] = {}
    if "ct2" in chosen:
        if not W.have_ct2():
            print("# ct2 rows skipped: CTranslate2 is not installed (pip install ctranslate2)")
        else:
            _ct2_race(table, small, base, args.smoke, rounds, warmup, ct2_info)
    if "int8" in chosen:
        _int8_products(table, small, base, args.smoke, rounds, warmup)
    if "lm" in chosen:
        block, lm_batch = (16, 2) if args.smoke else (64, 12)
        res = compare(W.lm_contenders(hf, block=block, batch=lm_batch), rounds, warmup)
        table.add("lm step", res, block * lm_batch, "tokens/s")
    if "llama" in chosen:
        if not hf:
            print("# llama rows skipped: HF transformers is not installed (pip install .[bench])")
        else:
            _llama(table, args.smoke, bf16_modes, rounds, warmup)
    if "mfu" in chosen:
        for bf16 in bf16_modes:
            table.put([_mfu(base, bf16, batch, length, rounds, warmup)])
    if "memory" in chosen:
        for bf16 in bf16_modes:
            table.put(_memory(base, bf16, hf, batch, length))
    meta = {
        "date": str(datetime.date.today()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_kind": backend.cpu_description(),
        "cpu_paths": cpu.cpu_paths().describe(),
        "python": sys.version.split()[0],
        "hf": hf,
        "smoke": args.smoke,
        "rounds": rounds,
        "int8_products": _int8_kind(),
        "ours": ours_info,
        "ctranslate2": ct2_info,
        "unreliable_if": {
            "alone_vs_interleaved_over": AGREE,
            "ratio_iqr_over_fraction": SPREAD,
            "others_cores_over": BUSY,
        },
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": table.rows}, indent=1))
    missed = [r for r in table.rows if r.get("met") is False]
    flagged = sum(1 for r in table.rows if "unreliable" in r)
    print(
        f"# wrote {args.json}; targets met: {sum(1 for r in table.rows if r.get('met'))}, missed: {len(missed)}, "
        f"rows unreliable (no ratio, target not judged): {flagged}"
    )
    return 0


def _ct2_race(
    table: Table, small: W.Size, base: W.Size, smoke: bool, rounds: int, warmup: int, ct2_info: dict[str, dict]
) -> None:
    """Ours against CTranslate2's worker process. After every call both processes are waited on until idle
    (harness.Quiet), so neither's spinning OpenMP threads take cores from the other's timed call; each
    contender is also run alone, back to back, as the sanity figure beside its interleaved median."""
    import tempfile

    ours_row = {"threads": torch.get_num_threads(), "isa": torch.backends.cpu.get_cpu_capability()}
    for size_name, size in (("small", small), ("base", base)):
        for beam, sentences in ((1, 2 if smoke else 32), (5, 2 if smoke else 8)):
            n = 8 if smoke else 64
            for int8 in (False, True):
                with tempfile.TemporaryDirectory() as d:
                    contenders, worker = W.ct2_contenders(size, n, sentences, beam, int8, Path(d) / "ct2")
                    try:
                        info = worker.info
                        if info["compute_type"] not in ct2_info:
                            ct2_info[info["compute_type"]] = info
                            print(
                                f"# CTranslate2 {info['version']} ({info['compute_type_asked']} asked, "
                                f"{info['compute_type']} chosen): {info['intra_threads']} intra / "
                                f"{info['inter_threads']} inter threads, its kernels {info.get('isa')}, MKL "
                                f"{info.get('mkl')}, SGEMM {info.get('sgemm')}, GEMM_S8 {info.get('gemm_s8')}, "
                                f"OpenMP {', '.join(info['openmp']) or 'none seen'}, settings {info['env']}; "
                                f"CPU {info.get('cpu')}; supported here: {', '.join(info['supported_compute_types'])}",
                                flush=True,
                            )
                        settle = Quiet([os.getpid(), worker.pid])
                        res = compare(contenders, rounds, warmup, settle=settle, alone=1 if smoke else 3)
                    finally:
                        worker.close()
                gemm = info.get("gemm_s8" if int8 else "sgemm")
                theirs = {
                    "threads": info["intra_threads"],
                    "isa": info.get("isa"),
                    "compute_type": info["compute_type"],
                    "gemm": gemm,
                }
                kind = "greedy" if beam == 1 else "beam5"
                table.add(
                    f"ct2 {kind} {size_name} {'int8' if int8 else 'fp32'}",
                    res,
                    sentences * n,
                    "tokens/s",
                    info={"ours": ours_row, "CTranslate2": theirs},
                )


def _llama(table: Table, smoke: bool, bf16_modes: tuple, rounds: int, warmup: int) -> None:
    """Prefill and decode rows of the Llama-shaped model (bench/llm.py), per precision and batch."""
    ours, hf = llm.models(smoke)
    prompt, new = (8, 4) if smoke else (128, 32)
    for bf16 in bf16_modes:
        for batch in (1, 8):
            name = f"{'bf16' if bf16 else 'fp32'} b{batch}"
            res = compare(llm.contenders(ours, hf, batch, prompt, new, bf16), rounds, warmup, same_work=False)
            prefill, decode = llm.split(res)
            table.add(f"llama prefill {name}", prefill, batch * prompt, "tokens/s")
            table.add(f"llama decode {name}", decode, batch * new, "tokens/s")


def _int8_kind() -> str:
    from transformer.cpu import int8

    if not int8.available():
        return "PyTorch's fbgemm (this package's kernel does not run here)"
    return "this package's kernel, AVX-512 VNNI" + (" and AMX" if int8.uses_amx() else "")


def _int8_products(table: Table, small: W.Size, base: W.Size, smoke: bool, rounds: int, warmup: int) -> None:
    """Each int8 product of a decoding step (greedy's 32 rows at the base size, beam 5's 40 at the small one):
    our int8 kernel against fbgemm, where the kernel runs (cpu/int8.py)."""
    from transformer.cpu import int8

    if not int8.available():
        print("# int8 rows skipped: our int8 kernel does not run here (cpu/int8.py says why), so int8 is fbgemm's")
        return
    for size, rows in ((base, 32), (small, 40)):
        for M, K, N in W.int8_product_shapes(size, 2 if smoke else rows):
            res = compare(W.int8_product_contenders(M, K, N, 1e6 if smoke else 64e6), rounds, warmup)
            table.add(f"int8 {M}x{K}x{N}", res, M * K * N * res["ours"]["work"][0] / 1e9, "GMAC/s")


def _mfu(size: W.Size, bf16: bool, batch: int, length: int, rounds: int, warmup: int) -> dict:
    """Model FLOPs utilisation of our training step: its products' FLOPs per second against the best rate of
    products of the step's own shapes, measured in the same rounds (interleaved with the step, best round)."""
    flops = W.step_flops(size, bf16, batch, length)
    step = W.train_contenders(size, bf16, False, batch, length)["ours"]
    peak = W.product_peak(W.step_product_shapes(size, batch * length), bf16)
    res = compare({"ours": step, "peak": peak}, rounds, warmup, same_work=False)
    measured = max(res["peak"]["work"])
    achieved = flops / res["ours"]["median_s"]
    nominal, how = W.nominal_peak(bf16)
    row = {
        "workload": f"mfu base {'bf16' if bf16 else 'fp32'}",
        "contender": "ours",
        "model_tflops": round(achieved / 1e12, 4),
        "peak_tflops": round(measured / 1e12, 4),
        "mfu": round(achieved / measured, 3),
        "nominal_tflops": round(nominal / 1e12, 4) if nominal else None,
        "nominal_mfu": round(achieved / nominal, 3) if nominal else None,
        "nominal": how,
    }
    return row


def _memory(size: W.Size, bf16: bool, hf: bool, batch: int, length: int) -> list[dict]:
    contenders = W.train_contenders(size, bf16, hf, batch, length)
    for c in contenders.values():
        c()  # the first step allocates the optimizer state: measure a steady one
    return [
        {
            "workload": f"memory base {'bf16' if bf16 else 'fp32'}",
            "contender": name,
            "peak_mib": round(W.peak_memory(step) / 2**20, 1),
        }
        for name, step in contenders.items()
    ]


if __name__ == "__main__":
    sys.exit(main())
