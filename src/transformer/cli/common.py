"""What the commands share: logging and progress, argument types and options, loading a checkpoint, decoding."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..distributed import is_main_process
from ..errors import TransformerError
from ..generate import DecodingSettings

log = logging.getLogger("transformer")


class _StderrHandler(logging.Handler):
    """Log lines to whatever sys.stderr is at the time (so redirection and test capture work)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(quiet: bool) -> None:
    quiet = quiet or not is_main_process()
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


class ProgressBar:
    """A tqdm bar fed by the trainer's progress callback: loss, learning rate, tokens/s, ETA."""

    def __init__(self, total: Optional[int], enabled: bool, max_minutes: float = 0.0) -> None:
        self.bar = None
        self.max_minutes = max_minutes
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, info: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.update(info["step"] - self.bar.n)
        post = {"loss": f"{info['loss']:.3f}", "lr": f"{info['lr']:.2e}", "tok/s": f"{info['tokens_per_s']:.0f}"}
        if self.max_minutes:
            post["left"] = f"{max(0.0, self.max_minutes - info['minutes']):.1f}min"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def number(kind: type, minimum: float, what: str):
    """An argparse type: a number of `kind` that is at least `minimum`."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse


positive_int = number(int, 1, "an integer")
nonneg_float = number(float, 0, "a number")
positive_float = number(float, 0.1, "a number")


def overwrite_option(q: argparse.ArgumentParser, what: str) -> None:
    q.add_argument(
        "--overwrite", action="store_true", help=f"replace {what}; a directory holding anything else is never written"
    )


def device_option(q: argparse.ArgumentParser) -> None:
    q.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")


def decoding_options(q: argparse.ArgumentParser) -> None:
    """The options of the commands that translate (`DecodingSettings` and the precision)."""
    q.add_argument("--beam", type=positive_int, default=1, help="beam size (1 = greedy)")
    q.add_argument("--batch-size", type=positive_int, default=64, help="sentences per batch")
    q.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length**LP")
    q.add_argument("--bf16", action="store_true", help="decode under bf16 autocast (faster, slightly different)")
    q.add_argument(
        "--int8", action="store_true", help="decode with int8 weights on the CPU (faster, slightly different)"
    )
    device_option(q)
    adapter_option(q)


def decoding_settings(args: argparse.Namespace) -> DecodingSettings:
    defaults = DecodingSettings()
    return DecodingSettings(
        args.beam,
        args.length_penalty,
        getattr(args, "max_len_a", defaults.max_len_a),
        getattr(args, "max_len_b", defaults.max_len_b),
    )


def read_inputs(texts: Sequence[str], input_file: Optional[str]) -> list[str]:
    """The texts of a command: its arguments, the lines of --input, or the lines of stdin."""
    if texts and input_file:
        raise TransformerError("give sentences as arguments or with --input, not both")
    if input_file:
        from ..data import read_lines

        return read_lines(input_file, "input file")
    if texts:
        return list(texts)
    return [line.rstrip("\r\n") for line in sys.stdin]


def run_trainer(run, out: Path, resume: bool, quiet: bool, overwrite: bool = False):
    """Train `run` into `out` with a progress bar: (trainer, its final record, seconds)."""
    from ..train import Trainer

    trainer = Trainer(run, out, resume=resume, overwrite=overwrite)
    t = run.train
    bar = ProgressBar(t.max_steps or None, enabled=not quiet and is_main_process(), max_minutes=t.max_minutes)
    trainer.progress = bar
    try:
        started = time.perf_counter()
        record = trainer.train()
        seconds = time.perf_counter() - started
    finally:
        bar.close()
    return trainer, record, seconds


def adapter_option(q: argparse.ArgumentParser) -> None:
    q.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (peft's layout) to decode with, unmerged")


def load(args: argparse.Namespace, task: str):
    """The checkpoint named on the command line, on the device that --device names, with the LoRA adapter that
    --adapter names (where the command has the option)."""
    from ..backend import resolve_device
    from ..checkpoint import load_checkpoint

    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device=device, task=task)
    if getattr(args, "adapter", None):
        from ..interop.peft import with_adapter

        ckpt = with_adapter(ckpt, args.adapter, device)
    return ckpt


def decoding(ckpt, args: argparse.Namespace):
    """The precision to decode in: fp32, --bf16 (bf16 autocast, or bf16 weights on a GPU) or --int8 (int8
    weights on the CPU)."""
    from ..backend import decoding as decoding_context

    return decoding_context(ckpt.model, args.bf16, getattr(args, "int8", False))
