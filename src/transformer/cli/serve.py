"""`serve`: a checkpoint over HTTP (the JSON API, dynamic batching, a page at /)."""

from __future__ import annotations

import argparse

from .common import adapter_option, device_option, nonneg_float, positive_int


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
    sv.add_argument("--max-batch", type=positive_int, default=64, help="texts per batch (1: no batching)")
    sv.add_argument("--max-texts", type=positive_int, default=64, help="texts per request (default 64)")
    sv.add_argument("--max-text-chars", type=positive_int, default=2000, help="characters per text (default 2000)")
    sv.add_argument("--max-body-bytes", type=positive_int, default=1_000_000, help="request body (default 1 MB)")
    sv.add_argument("--max-beam", type=positive_int, default=16)
    sv.add_argument("--max-new-tokens", type=positive_int, default=512)
    sv.add_argument("--bf16", action="store_true", help="decode in bf16 (where it is native)")
    sv.add_argument(
        "--int8", action="store_true", help="decode with int8 weights on the CPU (faster, slightly different results)"
    )
    adapter_option(sv)
    device_option(sv)
    sv.set_defaults(fn=serve)


def serve(args: argparse.Namespace) -> int:
    from ..serve import Limits
    from ..serve import serve as run_server

    limits = Limits(args.max_texts, args.max_text_chars, args.max_body_bytes, args.max_beam, args.max_new_tokens)
    run_server(
        args.checkpoint,
        args.host,
        args.port,
        args.device,
        args.bf16,
        limits,
        args.max_batch_tokens,
        args.max_wait_ms,
        args.max_batch,
        args.int8,
        args.adapter,
    )
    return 0
