"""Abuse under load: well-formed translation clients with and without abusive ones beside them, over loopback.

    python -m bench.serve_abuse CKPT --src FILE [--clients 8] [--seconds 60] [--warmup 5]
                                [--serve-args "--max-refusals-per-s 0"]

CKPT is a translation checkpoint (`make demo` writes one: demo-run/best). The server runs with its default
limits, or those --serve-args give (in both phases). Two phases of --seconds each, on a fresh server each:

- baseline: --clients well-formed clients, each sending one sentence of FILE per request (beam 1), back to back;
- abuse: the same clients, and beside them, each in a loop: texts of the maximal length with max_len_a 10 and the
  largest max_len_b; 64 texts at beam 16; /v1/attention on the longest text allowed and on one too long; slow
  clients that send their body a byte every 0.5 s and their headers a byte every 0.5 s; clients that send a
  large request and disconnect after 0.2 s; bodies over the limit without a declared length. The abusive clients
run in a process of their own (all share the machine's cores with the server).

For each phase: the well-formed clients' requests and latency p50/p95; every status seen, by kind of client; 5xx
(the target is none); the server's RSS (largest sample, and that of the first and of the last third of the phase:
bounded memory does not grow); /health polled every 0.5 s (its worst latency and any
failure). Prints the abuse/baseline p95 ratio (the target is <= 2) and writes --json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.serve_load import free_port, rss_mib, sample_rss, wait_for_health


async def well_formed(url: str, sentences: list[str], i: int, until: float, out: dict) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        n = 0
        while time.perf_counter() < until:
            start = time.perf_counter()
            r = await c.post("/v1/translate", json={"texts": [sentences[(i * 97 + n) % len(sentences)]]})
            out["latency"].append(time.perf_counter() - start)
            out["status"]["well-formed"][r.status_code] += 1
            n += 1


async def abuser(url: str, kind: str, body: dict, path: str, until: float, out: dict, hang_up: float = 0) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        while time.perf_counter() < until:
            try:
                if hang_up:
                    await asyncio.wait_for(c.post(path, json=body), hang_up)
                else:
                    r = await c.post(path, json=body)
                    out["status"][kind][r.status_code] += 1
                    continue
            except asyncio.TimeoutError:
                out["status"][kind]["hung up"] += 1
            except httpx.HTTPError as e:
                out["status"][kind][type(e).__name__] += 1
                await asyncio.sleep(0.1)


async def unbounded_body(url: str, until: float, out: dict) -> None:
    import httpx

    async def chunks():
        for _ in range(200):
            yield b"x" * 100_000

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        while time.perf_counter() < until:
            try:
                r = await c.post("/v1/translate", content=chunks(), headers={"content-type": "application/json"})
                out["status"]["chunked body over the limit"][r.status_code] += 1
            except httpx.HTTPError as e:
                out["status"]["chunked body over the limit"][type(e).__name__] += 1


def slow_client(port: int, kind: str, until: float, out: dict) -> None:
    """A byte every 0.5 s: of the body after whole headers, or of the headers themselves."""
    head = b"POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n"
    while time.perf_counter() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if kind == "slow body":
                    s.sendall(head)
                data = head if kind == "slow headers" else b"{" + b" " * 999
                answer = b""
                for byte in data:
                    if time.perf_counter() >= until:
                        break
                    s.sendall(bytes([byte]))
                    s.settimeout(0.5)
                    try:
                        chunk = s.recv(4096)
                    except socket.timeout:
                        continue
                    if not chunk:
                        break
                    answer += chunk
                status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1") else "closed"
                out["status"][kind][status] += 1
        except OSError as e:
            out["status"][kind][type(e).__name__] += 1
            time.sleep(0.2)


def health_poller(url: str, until: float, out: dict) -> None:
    import httpx

    while time.perf_counter() < until:
        start = time.perf_counter()
        try:
            ok = httpx.get(url + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            ok = False
        out["health_worst_ms"] = max(out["health_worst_ms"], (time.perf_counter() - start) * 1000)
        out["health_failures"] += not ok
        time.sleep(0.5)


def abuse_process(url: str, port: int, sentences: list[str], seconds: float, results) -> None:
    """Every abusive client, for `seconds`; their statuses put on `results`."""
    out = {"status": collections.defaultdict(collections.Counter)}
    until = time.perf_counter() + seconds
    threads = [
        threading.Thread(target=slow_client, args=(port, kind, until, out), daemon=True)
        for kind in ("slow body", "slow headers")
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    longest = max(sentences, key=len)
    big = (longest + " ") * (2000 // (len(longest) + 1))

    async def everyone():
        await asyncio.gather(
            abuser(url, "maximal lengths", {"texts": [big] * 8, "max_len_a": 10, "max_len_b": 512}, "/v1/translate",
                   until, out),
            abuser(url, "beam 16 x 64 texts", {"texts": sentences[:64], "beam": 16}, "/v1/translate", until, out),
            abuser(url, "attention, longest allowed", {"text": " ".join(longest.split()[:20])}, "/v1/attention",
                   until, out),
            abuser(url, "attention, too long", {"text": big}, "/v1/attention", until, out),
            abuser(url, "disconnect after 0.2 s", {"texts": sentences[:64], "beam": 16}, "/v1/translate", until,
                   out, hang_up=0.2),
            unbounded_body(url, until, out),
        )  # fmt: skip

    asyncio.run(everyone())
    for t in threads:
        t.join(timeout=30)
    results.put({k: dict(v) for k, v in out["status"].items()})


def phase(
    ckpt: str, sentences: list[str], clients: int, seconds: float, abuse: bool, flags=(), warmup: float = 5.0
) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "transformer", "serve", ckpt, "--port", str(port), "--device", "cpu", *flags]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    out = {
        "latency": [],
        "status": collections.defaultdict(collections.Counter),
        "health_worst_ms": 0.0,
        "health_failures": 0,
    }
    try:
        wait_for_health(url)
        warm = time.perf_counter() + warmup
        asyncio.run(asyncio.wait_for(well_formed(url, sentences, 0, warm, out), 60))  # warm-up, not counted
        out["latency"].clear()
        out["status"].clear()
        until = time.perf_counter() + seconds
        samples: list[float] = []
        threads = [
            threading.Thread(target=sample_rss, args=(proc.pid, samples, seconds), daemon=True),
            threading.Thread(target=health_poller, args=(url, until, out), daemon=True),
        ]
        abusers = None
        if abuse:  # in their own process: their Python work is not billed to the well-formed clients' latency
            ctx = multiprocessing.get_context("fork")
            results = ctx.Queue()
            abusers = ctx.Process(target=abuse_process, args=(url, port, sentences, seconds, results))
            abusers.start()
        for t in threads:
            t.start()

        async def everyone():
            await asyncio.gather(*(well_formed(url, sentences, i, until, out) for i in range(clients)))

        asyncio.run(everyone())
        for t in threads:
            t.join(timeout=30)
        if abusers is not None:
            for kind, counts in results.get(timeout=120).items():
                out["status"][kind].update(counts)
            abusers.join(timeout=30)
        lat = out["latency"]
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
        statuses = {k: {str(s): n for s, n in v.items()} for k, v in out["status"].items()}
        return {
            "well_formed_requests": len(lat),
            "p50_ms": round(q[49] * 1000, 1),
            "p95_ms": round(q[94] * 1000, 1),
            "statuses": statuses,
            "5xx": sum(n for v in out["status"].values() for s, n in v.items() if str(s).startswith("5")),
            "rss_max_mib": round(max(samples, default=rss_mib(proc.pid)), 1),
            # bounded, not growing: the largest sample of the first and of the last third of the phase
            "rss_first_last_third_mib": [round(max(part, default=0), 1) for part in thirds(samples)],
            "health_worst_ms": round(out["health_worst_ms"], 1),
            "health_failures": out["health_failures"],
        }
    finally:
        proc.kill()


def thirds(samples: list[float]) -> tuple[list[float], list[float]]:
    k = max(1, len(samples) // 3)
    return samples[:k], samples[-k:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_abuse", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--src", required=True, help="sentences for the well-formed clients, one per line")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of well-formed load before each phase")
    p.add_argument("--serve-args", default="", help="more `transformer serve` flags, for both phases")
    p.add_argument("--json", default="bench/serve_abuse.json")
    args = p.parse_args(argv)
    flags = shlex.split(args.serve_args)
    sentences = [s.strip() for s in Path(args.src).read_text(encoding="utf-8").splitlines() if s.strip()]
    table = {"clients": args.clients, "seconds": args.seconds, "serve_args": flags}
    run = dict(flags=flags, warmup=args.warmup)
    table["baseline"] = phase(args.checkpoint, sentences, args.clients, args.seconds, abuse=False, **run)
    print("baseline", table["baseline"], flush=True)
    table["abuse"] = phase(args.checkpoint, sentences, args.clients, args.seconds, abuse=True, **run)
    print("abuse", table["abuse"], flush=True)
    table["p95_ratio"] = round(table["abuse"]["p95_ms"] / table["baseline"]["p95_ms"], 2)
    print(json.dumps(table, indent=1))
    Path(args.json).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
