"""`generate`: sample text from a language-model checkpoint, streamed to stdout."""

from __future__ import annotations

import argparse
import sys

from .common import device_option, load, positive_int


def add_generate(sub) -> None:
    g = sub.add_parser("generate", help="sample text from a language-model checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most probable tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with probability >= p")
    g.add_argument("--num-samples", type=positive_int, default=1)
    g.add_argument("--seed", type=int, default=0)
    device_option(g)
    g.set_defaults(fn=generate)


def generate(args: argparse.Namespace) -> int:
    import torch

    from ..generate import SamplingSettings, TextStream, sample

    s = SamplingSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    ckpt = load(args, "lm")
    tok = ckpt.tgt_tokenizer
    # with no prompt, start from a newline (what the text's lines follow), or <s> if the vocabulary has none
    ids = tok.encode(args.prompt or "\n") or [ckpt.config.bos_id]
    device = next(ckpt.model.parameters()).device
    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    context = ckpt.meta.get("run", {}).get("data", {}).get("block_size")
    gen = torch.Generator().manual_seed(s.seed)
    for n in range(args.num_samples):
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        stream = TextStream(tok, ids)
        for tokens in sample(
            ckpt.model, prompt[n : n + 1], s.max_new_tokens, s.temperature, s.top_k, s.top_p, gen, context
        ):
            sys.stdout.write(stream.push(int(tokens[0])))
            sys.stdout.flush()
        sys.stdout.write("\n" if n == args.num_samples - 1 else "\n---\n")
    return 0
