"""Load test of `transformer serve`: concurrent clients over loopback, each sending one sentence per request.

    python -m bench.serve_load CKPT --src ../shared/data/multi30k/test2016.en [--clients 64] [--seconds 60]

Runs the server three ways and prints a table: with dynamic batching, with batching off (--max-batch 1), and
the offline figure (`translate_texts` over the same sentences, in this process, same beam). For each server
run: sentences/s, latency p50/p95/p99, errors (anything but a 200 with one translation), 5xx, and the server's
RSS at the start and the end. Bounded in time: the clients stop after --seconds, the run after that.
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
import time
from pathlib import Path


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def clients(url: str, sentences: list[str], n: int, seconds: float, beam: int) -> dict:
    import httpx

    latencies, errors, server_errors = [], 0, 0
    until = time.perf_counter() + seconds

    async def one(i: int, c) -> None:
        nonlocal errors, server_errors
        k = i
        while time.perf_counter() < until:
            sentence = sentences[k % len(sentences)]
            k += n
            start = time.perf_counter()
            try:
                r = await c.post("/v1/translate", json={"texts": [sentence], "beam": beam})
                ok = r.status_code == 200 and len(r.json()["translations"]) == 1
                server_errors += r.status_code >= 500
            except Exception:  # a refused or dropped connection counts as an error
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        started = time.perf_counter()
        await asyncio.gather(*(one(i, c) for i in range(n)))
        elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"sentences_per_s": round(len(latencies) / elapsed, 1), "requests": len(latencies) + errors,
            "p50_ms": round(q[49] * 1000, 1), "p95_ms": round(q[94] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
            "errors": errors, "5xx": server_errors}


def run_server(ckpt: str, extra: list[str], sentences: list[str], n: int, seconds: float, beam: int) -> dict:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "transformer", "serve", ckpt, "--port", str(port), "--device", "cpu",
                             *extra], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        asyncio.run(clients(url, sentences[:64], 4, 2.0, beam))  # warm-up, not counted
        start_rss = rss_mib(proc.pid)
        result = asyncio.run(clients(url, sentences, n, seconds, beam))
        result.update(rss_start_mib=round(start_rss, 1), rss_end_mib=round(rss_mib(proc.pid), 1))
        result["rss_growth"] = round(result["rss_end_mib"] / result["rss_start_mib"] - 1, 3)
        proc.send_signal(signal.SIGTERM)
        result["exit_code"] = proc.wait(timeout=120)
        return result
    finally:
        if proc.poll() is None:
            proc.kill()


def offline(ckpt: str, sentences: list[str], beam: int) -> dict:
    from transformer.checkpoint import load_checkpoint
    from transformer.generate import translate_texts

    c = load_checkpoint(ckpt)
    translate_texts(c.model, c.src_tokenizer, c.tgt_tokenizer, sentences[:64], beam_size=beam)  # warm-up
    start = time.perf_counter()
    translate_texts(c.model, c.src_tokenizer, c.tgt_tokenizer, sentences, beam_size=beam, batch_size=64)
    return {"sentences_per_s": round(len(sentences) / (time.perf_counter() - start), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--src", required=True, help="sentences to send, one per line")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--json", default="bench/serve_load.json")
    args = p.parse_args(argv)
    sentences = [s.strip() for s in Path(args.src).read_text(encoding="utf-8").splitlines() if s.strip()]
    table = {"clients": args.clients, "seconds": args.seconds, "beam": args.beam}
    table["batching"] = run_server(args.checkpoint, [], sentences, args.clients, args.seconds, args.beam)
    print("batching   ", table["batching"], flush=True)
    table["no_batching"] = run_server(args.checkpoint, ["--max-batch", "1"], sentences, args.clients, args.seconds,
                                      args.beam)
    print("max batch 1", table["no_batching"], flush=True)
    table["offline"] = offline(args.checkpoint, sentences, args.beam)
    print("offline    ", table["offline"], flush=True)
    b = table["batching"]["sentences_per_s"]
    table["vs_no_batching"] = round(b / table["no_batching"]["sentences_per_s"], 2)
    table["vs_offline"] = round(b / table["offline"]["sentences_per_s"], 2)
    print(json.dumps(table))
    Path(args.json).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
