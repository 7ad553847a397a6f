"""CTranslate2 in a process of its own, for the race in `workloads.ct2_contenders`.

Loaded into our process, CTranslate2's OpenMP calls resolve to the OpenMP runtime torch loaded first, and its
worker thread adds a second thread team to it; the runtime then throttles the spin-waiting of every team, so our
decoding's threads slept between operations and it ran about 30% slower after CTranslate2 had run once in the
process (5,500 voluntary context switches per decoding instead of none). Users do not run the two in one process,
so the race does not either. This module imports neither torch nor the package. The worker applies the glibc
allocator settings our process runs with (`backend.ALLOCATOR_SETTINGS`, passed in), so that neither side gains
from the allocator alone.
"""

from __future__ import annotations

import ctypes
import multiprocessing
from multiprocessing.connection import Connection


def _serve(conn: Connection, directory: str, compute_type: str, threads: int,
           mallopt: tuple[tuple[int, int], ...]) -> None:
    for param, value in mallopt:  # the allocator settings of our process (empty: glibc's defaults)
        ctypes.CDLL(None).mallopt(param, value)
    import ctranslate2

    translator = ctranslate2.Translator(directory, device="cpu", compute_type=compute_type,
                                        intra_threads=threads, inter_threads=1)
    conn.send("ready")
    while True:
        request = conn.recv()
        if request is None:
            return
        tokens, options = request
        out = translator.translate_batch(tokens, **options)
        conn.send(sum(len(r.hypotheses[0]) for r in out))


class Translator:
    """A CTranslate2 Translator in a child process: `translate(tokens, **options)` returns the number of tokens
    written (the best hypothesis of each sentence)."""

    def __init__(self, directory: str, compute_type: str, threads: int,
                 mallopt: tuple[tuple[int, int], ...] = ()) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, directory, compute_type, threads, mallopt), daemon=True)
        self._process.start()
        if not self._conn.poll(120) or self._conn.recv() != "ready":
            raise RuntimeError("the CTranslate2 process did not start")

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
