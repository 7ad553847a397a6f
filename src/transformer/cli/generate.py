"""`generate`: sample text from a language-model checkpoint, streamed to stdout; `chat`: talk to a chat model."""

from __future__ import annotations

import argparse
import sys

from ..errors import TransformerError
from .common import adapter_option, device_option, load, positive_int


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
    g.add_argument(
        "--chat", metavar="MESSAGE", help="one chat turn: the reply to MESSAGE, in the model's chat template"
    )
    g.add_argument("--system", help="with --chat: a system message")
    adapter_option(g)
    device_option(g)
    g.set_defaults(fn=generate)


def add_chat(sub) -> None:
    c = sub.add_parser("chat", help="talk to a chat model (its chat template, the cache kept across turns)")
    c.add_argument("checkpoint")
    c.add_argument("--system", help="a system message that opens the conversation")
    c.add_argument("--max-new-tokens", type=int, default=512, help="the longest reply, in tokens")
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--seed", type=int, default=0)
    adapter_option(c)
    device_option(c)
    c.set_defaults(fn=chat)


def _session(args: argparse.Namespace):
    from ..chat import ChatSession
    from ..generate import SamplingSettings

    s = SamplingSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    ckpt = load(args, "lm")
    return ChatSession(ckpt.model, ckpt.tgt_tokenizer, ckpt.meta.get("chat") or {}, args.system, s)


def chat(args: argparse.Namespace) -> int:
    """Read a message per line from stdin, stream each reply; `/reset` starts over, end of input ends."""
    with _session(args) as session:
        return _conversation(session)


def _conversation(session) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        sys.stderr.write("(a message per line; /reset starts over; Ctrl-D ends)\n")
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            sys.stderr.write("(conversation reset)\n")
            continue
        if text.strip():
            _print_reply(session, text)


def _print_reply(session, text: str) -> None:
    """The reply to `text`, streamed to stdout as it comes, then a newline."""
    for piece in session.reply(text):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def generate(args: argparse.Namespace) -> int:
    import torch

    from ..generate import SamplingSettings, TextStream, sample

    if args.chat is not None:
        with _session(args) as session:
            _print_reply(session, args.chat)
        return 0
    if args.system is not None:
        raise TransformerError("--system goes with --chat (or use `transformer chat`)")
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
            if int(tokens[0]) in ckpt.config.eos_ids:  # the model ended its text
                break
            sys.stdout.write(stream.push(int(tokens[0])))
            sys.stdout.flush()
        sys.stdout.write("\n" if n == args.num_samples - 1 else "\n---\n")
    return 0
