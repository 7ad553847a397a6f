"""CTranslate2 in a process of its own, for the race in `workloads.ct2_contenders`.

Loaded into our process, CTranslate2's OpenMP calls resolve to the OpenMP runtime torch loaded first, and its
worker thread adds a second thread team to it; the runtime then throttles the spin-waiting of every team, so our
decoding's threads slept between operations and it ran about 30% slower after CTranslate2 had run once in the
process (5,500 voluntary context switches per decoding instead of none). Users do not run the two in one process,
so the race does not either. This module imports neither torch nor the package. The worker applies the glibc
allocator settings our process runs with (`cpu.memory.ALLOCATOR_SETTINGS`, passed in), so that neither side gains
from the allocator alone.

CTranslate2 picks its own backend when it loads a model: Intel MKL on GenuineIntel CPUs only (CT2_USE_MKL
overrides), oneDNN elsewhere, for float32 and int8 products alike, and its own kernels' ISA (AVX2 on an AMD
EPYC with AVX-512; CT2_FORCE_CPU_ISA overrides); `python -m bench.ct2_backends` times each combination alone.
The worker sets the CT2_* variables it is given before importing ctranslate2 (they are read once), and reports
what CTranslate2 says it chose (its start-up log at info level: ISA, MKL, SGEMM and GEMM_S8 backends, compute
type), so that every figure names the backend it was measured with.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import re
import tempfile
from multiprocessing.connection import Connection

# What the record keeps of the environment: the threading, spin-wait and backend settings of both sides
SETTINGS = ("CT2_", "OMP_", "GOMP_", "KMP_", "MKL_", "ONEDNN_", "DNNL_", "ATEN_CPU_CAPABILITY")


def settings() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(SETTINGS)}


def openmp_runtime() -> list[str]:
    """The OpenMP runtimes mapped into this process (file names), e.g. ['libgomp-e985bcbb.so.1.0.0']."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if re.search(r"lib(gomp|iomp5|omp)\b", line)}
    except OSError:
        return []
    return sorted(os.path.basename(p) for p in paths)


def parse_report(log: str) -> dict[str, str]:
    """The backend choices in CTranslate2's info-level start-up log."""
    keys = {
        "cpu": r"\] CPU: (.+)",
        "isa": r"Selected ISA: (.+)",
        "mkl": r"Use Intel MKL: (.+)",
        "sgemm": r"SGEMM backend: (.+)",
        "gemm_s8": r"GEMM_S8 backend: (.+)",
        "compute_type": r"Selected compute type: (.+)",
    }
    found = {}
    for key, pattern in keys.items():
        m = re.search(pattern, log)
        if m:
            found[key] = m.group(1).strip()
    return found


def _serve(
    conn: Connection,
    directory: str,
    compute_type: str,
    threads: int,
    mallopt: tuple[tuple[int, int], ...],
    env: dict[str, str],
) -> None:
    os.environ.update(env)  # before the import: CTranslate2 reads CT2_* once
    for param, value in mallopt:  # the allocator settings of our process (empty: glibc's defaults)
        ctypes.CDLL(None).mallopt(param, value)
    import ctranslate2

    # Its choice of backend is only said in its log, on stderr, when the first model loads: catch it there.
    ctranslate2.set_log_level(logging.INFO)
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            translator = ctranslate2.Translator(
                directory, device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
            )
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            ctranslate2.set_log_level(logging.WARNING)
        log.seek(0)
        report = parse_report(log.read().decode(errors="replace"))
    info = {
        "version": ctranslate2.__version__,
        "compute_type_asked": compute_type,
        "compute_type": translator.compute_type,
        "intra_threads": threads,
        "inter_threads": 1,
        "supported_compute_types": sorted(ctranslate2.get_supported_compute_types("cpu")),
        "openmp": openmp_runtime(),
        "env": settings(),
        **{k: v for k, v in report.items() if k != "compute_type"},
    }
    conn.send(("ready", info))
    while True:
        request = conn.recv()
        if request is None:
            return
        tokens, options = request
        out = translator.translate_batch(tokens, **options)
        conn.send(sum(len(r.hypotheses[0]) for r in out))


class Translator:
    """A CTranslate2 Translator in a child process: `translate(tokens, **options)` returns the number of tokens
    written (the best hypothesis of each sentence). `info` says what it runs with (version, compute type asked
    and chosen, threads, ISA and GEMM backends, OpenMP runtime, CT2_*/OMP_* settings); `pid` is its process."""

    def __init__(
        self,
        directory: str,
        compute_type: str,
        threads: int,
        mallopt: tuple[tuple[int, int], ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_serve, args=(child, directory, compute_type, threads, mallopt, dict(env or {})), daemon=True
        )
        self._process.start()
        reply = self._conn.recv() if self._conn.poll(120) else None
        if not (isinstance(reply, tuple) and reply[0] == "ready"):
            raise RuntimeError("the CTranslate2 process did not start")
        self.info: dict = reply[1]
        self.pid: int = self._process.pid

    def translate(self, tokens: list[list[str]], **options) -> int:
        self._conn.send((tokens, options))
        return self._conn.recv()

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
            self._process.join(10)

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, ValueError, AttributeError):
            pass
