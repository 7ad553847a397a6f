"""CTranslate2's own backends on this CPU, timed alone: `python -m bench.ct2_backends`.

CTranslate2 picks its GEMM backend and kernel ISA itself when it loads a model (Intel MKL on GenuineIntel CPUs
only; AVX2 kernels on the CPUs where it does not choose AVX-512); `CT2_USE_MKL` and `CT2_FORCE_CPU_ISA` override
both. Before any CTranslate2 row of `python -m bench ct2` is trusted, this prints each combination's greedy and
beam-5 decoding of the base model (the bench's ct2 workload, CTranslate2 alone in its worker process, ours
idle), so that the row's backend can be seen to be CTranslate2's fastest here, or not.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import workloads as W

VARIANTS = [
    {},
    {"CT2_USE_MKL": "1"},
    {"CT2_FORCE_CPU_ISA": "AVX512"},
    {"CT2_USE_MKL": "1", "CT2_FORCE_CPU_ISA": "AVX512"},
]


def main() -> None:
    print(
        f"# CTranslate2 alone, base model, {torch.get_num_threads()} threads, median of 5 after 1 warm-up; CPU "
        f"vendor {W.cpu_vendor()}"
    )
    for int8 in (False, True):
        for beam, sentences in ((1, 32), (5, 8)):
            for variant in VARIANTS:
                saved = {k: os.environ.get(k) for k in variant}
                os.environ.update(variant)
                try:
                    with tempfile.TemporaryDirectory() as d:
                        contenders, worker = W.ct2_contenders(W.BASE, 64, sentences, beam, int8, Path(d) / "ct2")
                        try:
                            run = contenders["CTranslate2"]
                            run()
                            times = []
                            for _ in range(5):
                                t = time.perf_counter()
                                run()
                                times.append(time.perf_counter() - t)
                            info = worker.info
                        finally:
                            worker.close()
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
                print(
                    f"{'int8' if int8 else 'fp32'} beam{beam:<2} {str(variant or 'its own choice'):<48} "
                    f"median {statistics.median(times):.3f} s  ISA {info.get('isa')}  "
                    f"{'GEMM_S8 ' + str(info.get('gemm_s8')) if int8 else 'SGEMM ' + str(info.get('sgemm'))}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
