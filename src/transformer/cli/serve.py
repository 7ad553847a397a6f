"""`serve`: a checkpoint over HTTP (the JSON API, dynamic batching, a page at /)."""

from __future__ import annotations

import argparse
import os

from .common import adapter_option, device_option, nonneg_float, positive_float, positive_int


def add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="serve a checkpoint over HTTP (JSON API, dynamic batching, a page at /)")
    sv.add_argument("checkpoint")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=positive_int, default=8000)
    sv.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=4096,
        help="decode requests together up to this many source tokens (default 4096)",
    )
    sv.add_argument(
        "--max-wait-ms",
        type=nonneg_float,
        default=25.0,
        help="wait at most this long for more requests to join a batch (default 25)",
    )
    sv.add_argument(
        "--max-batch",
        type=positive_int,
        default=64,
        help="texts per batch, sequences generated at once (1: no batching)",
    )
    sv.add_argument(
        "--max-kv-tokens",
        type=positive_int,
        default=32768,
        help="a language model's KV cache in tokens: sequences x the longest prompt + max_tokens (default 32768)",
    )
    sv.add_argument("--max-queue", type=positive_int, default=256, help="requests waiting; beyond, 429 (default 256)")
    sv.add_argument("--max-texts", type=positive_int, default=64, help="texts per request (default 64)")
    sv.add_argument("--max-text-chars", type=positive_int, default=2000, help="characters per text (default 2000)")
    sv.add_argument("--max-body-bytes", type=positive_int, default=1_000_000, help="request body (default 1 MB)")
    sv.add_argument("--max-beam", type=positive_int, default=16)
    sv.add_argument(
        "--max-new-tokens", type=positive_int, default=512, help="output tokens per text or choice, every route (512)"
    )
    sv.add_argument(
        "--max-attention-tokens", type=positive_int, default=128, help="source tokens of /v1/attention (default 128)"
    )
    sv.add_argument(
        "--request-timeout",
        type=positive_float,
        default=300.0,
        help="seconds a request may wait and run, a stream between two pieces; then 504 (default 300)",
    )
    sv.add_argument(
        "--body-timeout",
        type=positive_float,
        default=10.0,
        help="seconds a client may take to send a request's headers, and its body; then it is cut off (default 10)",
    )
    sv.add_argument(
        "--max-refusals-per-s",
        type=nonneg_float,
        default=10.0,
        help="refused requests (4xx) a second from one client address; further ones are answered 1 s late, to slow "
        "a client that floods the server (0: off; default 10)",
    )
    sv.add_argument(
        "--max-connections", type=positive_int, default=512, help="open connections; beyond, 503 (default 512)"
    )
    sv.add_argument("--docs", action="store_true", help="serve the OpenAPI page at /docs (its scripts come from a CDN)")
    sv.add_argument(
        "--allowed-hosts",
        help="comma-separated Host header values to answer (default: loopback names, or any with --host 0.0.0.0)",
    )
    sv.add_argument("--bf16", action="store_true", help="decode in bf16 (where it is native)")
    sv.add_argument(
        "--int8", action="store_true", help="decode with int8 weights on the CPU (faster, slightly different results)"
    )
    sv.add_argument(
        "--api-key",
        default=os.environ.get("TRANSFORMER_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $TRANSFORMER_API_KEY)",
    )
    sv.add_argument("--insecure", action="store_true", help="allow a --host beyond loopback without an API key")
    sv.add_argument("--name", help="the model's id for OpenAI clients (default: the checkpoint directory's name)")
    adapter_option(sv)
    device_option(sv)
    sv.set_defaults(fn=serve)


def serve(args: argparse.Namespace) -> int:
    from ..serve import Batching, Limits
    from ..serve import serve as run_server

    limits = Limits(
        args.max_texts,
        args.max_text_chars,
        args.max_body_bytes,
        args.max_beam,
        args.max_new_tokens,
        args.max_attention_tokens,
        args.request_timeout,
        args.body_timeout,
        args.max_refusals_per_s,
    )
    batching = Batching(
        args.max_batch_tokens,
        args.max_wait_ms,
        args.max_batch,
        args.max_kv_tokens,
        args.max_queue,
        args.max_connections,
    )
    run_server(
        args.checkpoint,
        args.host,
        args.port,
        args.device,
        args.bf16,
        limits,
        batching,
        args.int8,
        args.adapter,
        args.api_key,
        args.insecure,
        args.name,
        args.docs,
        [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None,
    )
    return 0
