"""Load test of `transformer serve` on a language model: concurrent streaming clients of /v1/completions against
the same requests sent one at a time, over loopback.

    python -m bench.serve_llm [--checkpoint CKPT] [--clients 32] [--seconds 60] [--max-tokens 64] [--smoke]
                              [--peer]

Without --checkpoint the model is the decoder bench's Llama shape (bench/llm.py: 12 layers, d_model 768, GQA
12/4, SwiGLU, RoPE, 32k vocabulary; random weights drawn by transformers and imported) with a word-level
tokenizer whose every id is a word, so every token streams one piece of text. Every request asks for exactly
`--max-tokens` tokens (greedy rarely meets the end id of random weights; completion tokens are counted from
`usage` either way), from a prompt of 32 random words.

Prints and writes (--json) a table: output tokens/s of `--clients` sequential requests and of `--clients`
clients streaming for `--seconds` (after a warm-up at the full load), their ratio; time to first token and
inter-token latency p50/p95 of both; HTTP statuses (5xx counted); the server's RSS at the start and end of the
measured period and its largest sample. The clients run in this process, beside the server on the same cores.
With --peer (and the bench model), the same load is then sent to `transformers serve --continuous-batching` on
the same weights and tokenizer (the Hugging Face directory the checkpoint was imported from), for a second table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.serve_load import free_port, rss_mib, sample_rss, wait_for_health


def build_checkpoint(out: Path, smoke: bool) -> tuple[Path, Path]:
    """The bench Llama (random weights) with a word-level tokenizer of its whole vocabulary: its Hugging Face
    directory (out/hf) and the checkpoint imported from it (out/ckpt)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bench.llm import LLAMA, TINY_LLAMA
    from transformer.checkpoint import save_checkpoint
    from transformer.interop import from_pretrained

    shape = TINY_LLAMA if smoke else LLAMA
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).eval()
    hf_dir = out / "hf"
    hf.save_pretrained(hf_dir, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(shape["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    ckpt = from_pretrained(hf_dir, dtype="fp32")
    return hf_dir, save_checkpoint(out / "ckpt", ckpt.model, ckpt.task, ckpt.tokenizers, ckpt.meta)


async def one_request(client, model: str, prompt: str, max_tokens: int, record: dict) -> None:
    """One streamed completion: its time to first token, its gaps between tokens, its tokens and status."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sent = time.perf_counter()
    last = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        record["status"].append(r.status_code)
        if r.status_code != 200:
            await r.aread()
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                record["tokens"] += chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                if last is None:
                    record["ttft"].append(now - sent)
                else:
                    record["itl"].append(now - last)
                last = now


def new_record() -> dict:
    return {"status": [], "tokens": 0, "ttft": [], "itl": []}


async def sequential(url: str, model: str, prompts: list[str], max_tokens: int) -> dict:
    import httpx

    record = new_record()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        for p in prompts:
            await one_request(client, model, p, max_tokens, record)
        record["seconds"] = time.perf_counter() - start
    return record


async def concurrent(url: str, model: str, prompts: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    import httpx

    record = new_record()
    until = time.perf_counter() + seconds

    async def client_loop(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            n = 0
            while time.perf_counter() < until:
                await one_request(client, model, prompts[(i + n) % len(prompts)], max_tokens, record)
                n += 1

    start = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    record["seconds"] = time.perf_counter() - start
    return record


def summary(record: dict) -> dict:
    def pct(xs, q):
        return round(statistics.quantiles(xs, n=100)[q - 1] * 1000, 1) if len(xs) > 1 else float("nan")

    statuses = record["status"]
    return {
        "requests": len(statuses),
        "output_tokens": record["tokens"],
        "tokens_per_s": round(record["tokens"] / record["seconds"], 1),
        "ttft_p50_ms": pct(record["ttft"], 50),
        "ttft_p95_ms": pct(record["ttft"], 95),
        "itl_p50_ms": pct(record["itl"], 50),
        "itl_p95_ms": pct(record["itl"], 95),
        "non_200": sum(s != 200 for s in statuses),
        "5xx": sum(s >= 500 for s in statuses),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_llm", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a language-model checkpoint (default: the bench Llama, built here)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--warmup", type=float, default=10)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="a tiny model and a few seconds: checks the bench runs")
    p.add_argument("--peer", action="store_true", help="then the same load on `transformers serve`")
    p.add_argument("--json", default="bench/serve_llm.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.max_tokens = min(args.seconds, 3), min(args.warmup, 1), min(args.max_tokens, 8)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, ckpt = (None, args.checkpoint) if args.checkpoint else build_checkpoint(Path(tmp), args.smoke)
        vocab = _vocab(str(ckpt))
        port = free_port()
        ours = [sys.executable, "-m", "transformer", "serve", str(ckpt), "--port", str(port), "--device", "cpu"]
        table = {"ours": run([*ours, "--name", "bench"], "bench", port, vocab, args)}
        if args.peer and hf_dir is not None:
            port = free_port()
            peer = [str(Path(sys.executable).parent / "transformers"), "serve", str(hf_dir), "--port", str(port),
                    "--continuous-batching", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
            table["transformers serve"] = run(peer, str(hf_dir), port, vocab, args)
    print(json.dumps(table, indent=1))
    Path(args.json).write_text(json.dumps(table, indent=1))
    return 0


def _vocab(ckpt: str) -> int:
    from transformer.checkpoint import load_checkpoint

    return load_checkpoint(ckpt).config.tgt_vocab_size


def run(cmd: list[str], name: str, port: int, vocab: int, args) -> dict:
    """Start the server `cmd` (listening on `port`, serving model `name`), load it, stop it."""

    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(5, vocab)}" for _ in range(32)) for _ in range(args.clients)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url)
        asyncio.run(sequential(url, name, prompts[:2], args.max_tokens))  # warm-up
        table = {"clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens}
        table["sequential"] = summary(asyncio.run(sequential(url, name, prompts, args.max_tokens)))
        print("sequential", table["sequential"], flush=True)
        asyncio.run(concurrent(url, name, prompts, args.clients, args.warmup, args.max_tokens))  # warm-up
        start_rss, samples = rss_mib(proc.pid), []
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, samples, args.seconds), daemon=True)
        sampler.start()
        table["concurrent"] = summary(
            asyncio.run(concurrent(url, name, prompts, args.clients, args.seconds, args.max_tokens))
        )
        sampler.join()
        end_rss = rss_mib(proc.pid)
        table["concurrent"].update(
            rss_start_mib=round(start_rss, 1), rss_end_mib=round(end_rss, 1), rss_max_mib=round(max(samples), 1)
        )
        print("concurrent", table["concurrent"], flush=True)
        table["ratio"] = round(table["concurrent"]["tokens_per_s"] / table["sequential"]["tokens_per_s"], 2)
        proc.send_signal(signal.SIGTERM)
        table["exit_code"] = proc.wait(timeout=120)
        return table
    finally:
        if proc.poll() is None:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
