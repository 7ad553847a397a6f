"""The `transformer` command: argument parsing, progress and exit codes over the library. Each command's parser
sits beside its body, in the module of its group (`train`, `translate`, `encoder`, `pretrained`, `generate`,
`serve`, `viz`); `common` holds what they share.

Exit status: 0 success; 2 a user mistake (one line on stderr, no traceback); 130/143 training interrupted by
Ctrl-C/SIGTERM after saving a resumable checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import TransformerError
from . import encoder, generate, pretrained, serve, train, translate, viz
from .common import setup_logging

# the order of `transformer --help`
COMMANDS = [
    train.add_demo,
    train.add_prepare,
    train.add_train,
    translate.add_translate,
    translate.add_evaluate,
    pretrained.add_import,
    pretrained.add_export,
    pretrained.add_merge,
    encoder.add_classify,
    encoder.add_embed,
    serve.add_serve,
    train.add_average,
    generate.add_generate,
    generate.add_chat,
    viz.add_attention,
    viz.add_plot,
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transformer", description="Train, run and inspect Transformer models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # sentences may come after options too: `translate CKPT --beam 5 "a sentence"`
    if extra and isinstance(getattr(args, "text", None), list) and not any(e.startswith("-") for e in extra):
        args.text += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(quiet=getattr(args, "json", False))
    from ..cpu import memory
    from ..train import TrainingInterrupted

    memory.tune_allocator()  # this process is ours: keep freed memory for reuse (decoding allocates every step)

    try:
        return args.fn(args)
    except TrainingInterrupted as e:
        print(f"transformer: {e}", file=sys.stderr)
        return e.exit_code
    except TransformerError as e:
        print(f"transformer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transformer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # the machine's refusal (permissions, a full disk), not a bug: say which file
        where = f"{e.filename}: " if e.filename else ""
        print(f"transformer: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
