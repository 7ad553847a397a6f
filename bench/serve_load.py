"""Load test of `transformer serve`: concurrent clients over loopback, each sending one sentence per request.

    python -m bench.serve_load CKPT --src ../shared/data/multi30k/test2016.en [--clients 64] [--seconds 60] [--int8]

Runs the server three ways and prints a table: with dynamic batching, with batching off (--max-batch 1), and
the offline figure (`translate_texts` over the same sentences, in this process, same beam; measured before and
after the servers, and their mean taken). For each server
run: sentences/s, latency p50/p95/p99, errors (anything but a 200 with one translation), 5xx, and the server's
RSS: cold (loaded, no request yet), at the start (after 10 s of warm-up at the full load) and at the end, the
largest of samples every 2 s in between, and the growth from start to end. Bounded in time: the clients stop
after --seconds, the run after that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_for_health(url: str, seconds: float = 120) -> None:
    """Until the server at `url` answers /health (it loads its checkpoint first)."""
    import httpx

    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Connection:
    """One keep-alive HTTP/1.1 connection, as small a client as can be: the load generator shares this machine's
    cores with the server, so every millisecond it spends per request is taken from the server (httpx spends
    several times this per request)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.reader, self.writer = host, port, None, None

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def clients(url: str, sentences: list[str], n: int, seconds: float, beam: int) -> dict:
    host, port = url.rsplit("/", 1)[-1].split(":")
    latencies, errors, server_errors = [], 0, 0
    until = time.perf_counter() + seconds

    async def one(i: int) -> None:
        nonlocal errors, server_errors
        k, conn = i, Connection(host, int(port))
        while time.perf_counter() < until:
            sentence = sentences[k % len(sentences)]
            k += n
            start = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(
                    conn.post("/v1/translate", {"texts": [sentence], "beam": beam}), 120
                )
                ok = status == 200 and len(json.loads(body)["translations"]) == 1
                server_errors += status >= 500
            except Exception:  # a refused, dropped or timed-out connection counts as an error
                ok = False
                conn.close()
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "sentences_per_s": round(len(latencies) / elapsed, 1),
        "requests": len(latencies) + errors,
        "p50_ms": round(q[49] * 1000, 1),
        "p95_ms": round(q[94] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "errors": errors,
        "5xx": server_errors,
    }


def sample_rss(pid: int, samples: list[float], seconds: float, every: float = 2.0) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        samples.append(rss_mib(pid))
        time.sleep(every)


def run_server(
    ckpt: str, extra: list[str], sentences: list[str], n: int, seconds: float, beam: int, warmup: float = 10.0
) -> dict:

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "transformer", "serve", ckpt, "--port", str(port), "--device", "cpu", *extra],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url)
        cold_rss = rss_mib(proc.pid)
        # warm-up at the full load, not counted: the first batches of each size allocate what every later batch
        # of that size reuses (PyTorch's and the C library's allocators keep freed memory for reuse)
        asyncio.run(clients(url, sentences, n, warmup, beam))
        start_rss, samples = rss_mib(proc.pid), []
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, samples, seconds), daemon=True)
        sampler.start()
        result = asyncio.run(clients(url, sentences, n, seconds, beam))
        sampler.join()
        result.update(
            rss_cold_mib=round(cold_rss, 1),
            rss_start_mib=round(start_rss, 1),
            rss_end_mib=round(rss_mib(proc.pid), 1),
            rss_max_mib=round(max(samples, default=start_rss), 1),
        )
        result["rss_growth"] = round(result["rss_end_mib"] / result["rss_start_mib"] - 1, 3)
        proc.send_signal(signal.SIGTERM)
        result["exit_code"] = proc.wait(timeout=120)
        return result
    finally:
        if proc.poll() is None:
            proc.kill()


def offline(ckpt: str, sentences: list[str], beam: int, int8: bool = False) -> dict:
    import contextlib

    from transformer.checkpoint import load_checkpoint
    from transformer.cpu.linear import int8_weights
    from transformer.generate import DecodingSettings, translate_texts

    c = load_checkpoint(ckpt)
    with int8_weights(c.model) if int8 else contextlib.nullcontext():
        translate_texts(
            c.model, c.src_tokenizer, c.tgt_tokenizer, sentences[:64], DecodingSettings(beam_size=beam)
        )  # warm-up
        start = time.perf_counter()
        translate_texts(
            c.model, c.src_tokenizer, c.tgt_tokenizer, sentences, DecodingSettings(beam_size=beam), batch_size=64
        )
    return {"sentences_per_s": round(len(sentences) / (time.perf_counter() - start), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--src", required=True, help="sentences to send, one per line")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--int8", action="store_true", help="servers and the offline figure decode in int8")
    p.add_argument("--json", default="bench/serve_load.json")
    args = p.parse_args(argv)
    extra = ["--int8"] if args.int8 else []
    sentences = [s.strip() for s in Path(args.src).read_text(encoding="utf-8").splitlines() if s.strip()]
    table = {"clients": args.clients, "seconds": args.seconds, "beam": args.beam, "int8": args.int8}
    # the offline figure before and after the servers (this machine's speed drifts; their mean is the reference)
    before = offline(args.checkpoint, sentences, args.beam, args.int8)
    table["batching"] = run_server(args.checkpoint, extra, sentences, args.clients, args.seconds, args.beam)
    print("batching   ", table["batching"], flush=True)
    table["no_batching"] = run_server(
        args.checkpoint, ["--max-batch", "1", *extra], sentences, args.clients, args.seconds, args.beam
    )
    print("max batch 1", table["no_batching"], flush=True)
    after = offline(args.checkpoint, sentences, args.beam, args.int8)
    table["offline"] = {
        "sentences_per_s": round((before["sentences_per_s"] + after["sentences_per_s"]) / 2, 1),
        "before": before["sentences_per_s"],
        "after": after["sentences_per_s"],
    }
    print("offline    ", table["offline"], flush=True)
    b = table["batching"]["sentences_per_s"]
    table["vs_no_batching"] = round(b / table["no_batching"]["sentences_per_s"], 2)
    table["vs_offline"] = round(b / table["offline"]["sentences_per_s"], 2)
    print(json.dumps(table))
    Path(args.json).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
