"""Looking inside: `attention` (a checkpoint's attention weights for a sentence) and `plot` (training curves)."""

from __future__ import annotations

import argparse

from .common import device_option, load, positive_int


def add_attention(sub) -> None:
    at = sub.add_parser("attention", help="draw a checkpoint's attention weights for a sentence")
    at.add_argument("checkpoint")
    at.add_argument("source", help="source sentence")
    at.add_argument("--target", help="teacher-force this translation (default: the model's own greedy output)")
    at.add_argument("--out", help="PNG file (default attention.png, unless only --html is given)")
    at.add_argument("--html", help="also write an interactive, self-contained HTML page")
    at.add_argument(
        "--kind",
        action="append",
        choices=["encoder", "decoder", "cross"],
        help="which attention (repeatable; default all three)",
    )
    at.add_argument("--layer", type=positive_int, help="one layer (1-based), drawn large with --head")
    at.add_argument("--head", type=positive_int, help="one head (1-based)")
    device_option(at)
    at.set_defaults(fn=attention)


def attention(args: argparse.Namespace) -> int:
    from ..viz import attention_html, attention_maps, plot_attention

    ckpt = load(args, "translation")
    maps = attention_maps(ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, args.source, args.target)
    written = []
    if args.out or not args.html:
        written.append(
            plot_attention(
                maps,
                args.out or "attention.png",
                kinds=args.kind or ("encoder", "decoder", "cross"),
                layer=args.layer,
                head=args.head,
            )
        )
    if args.html:
        written.append(attention_html(maps, args.html))
    print(
        f"wrote {', '.join(map(str, written))}  (source: {' '.join(maps.src_tokens)} | "
        f"target: {' '.join(maps.tgt_tokens[1:])})"
    )
    return 0


def add_plot(sub) -> None:
    pl = sub.add_parser("plot", help="draw training curves from a run's metrics.jsonl")
    pl.add_argument("run_dir", help="run directory (or its metrics.jsonl)")
    pl.add_argument("--out", default="curves.png", help="PNG file to write (default curves.png)")
    pl.add_argument("--title", help="a title over the plots")
    pl.set_defaults(fn=plot)


def plot(args: argparse.Namespace) -> int:
    from ..viz import plot_curves

    out = plot_curves(args.run_dir, args.out, title=args.title)
    print(f"wrote {out}")
    return 0
