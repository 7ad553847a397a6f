"""Checkpoints in and out of other libraries: `import` (Hugging Face) and `export` (Hugging Face, CTranslate2)."""

from __future__ import annotations

import argparse

from ..errors import TransformerError
from .common import overwrite_option


def add_import(sub) -> None:
    im = sub.add_parser("import", help="turn a Hugging Face model directory (BERT, Marian, GPT-2) into a checkpoint")
    im.add_argument("hf_dir", help="a local directory with config.json, model.safetensors and tokenizer files")
    im.add_argument("--out", required=True, help="checkpoint directory to write")
    overwrite_option(im, "a checkpoint in --out")
    im.set_defaults(fn=import_model)


def import_model(args: argparse.Namespace) -> int:
    """A Hugging Face model directory -> a checkpoint of this package."""
    from ..checkpoint import save_checkpoint
    from ..interop import from_pretrained

    ckpt = from_pretrained(args.hf_dir)
    out = save_checkpoint(args.out, ckpt.model, ckpt.task, ckpt.tokenizers, ckpt.meta, overwrite=args.overwrite)
    cfg = ckpt.config
    print(
        f"imported a {ckpt.meta['hf_model_type']} model ({cfg.arch}, {cfg.d_model} wide, "
        f"{cfg.n_encoder_layers if cfg.arch != 'decoder-only' else cfg.n_decoder_layers} layers) into {out} "
        f"as a '{ckpt.task}' checkpoint"
    )
    return 0


def add_export(sub) -> None:
    ex = sub.add_parser("export", help="write a checkpoint in another library's format")
    ex.add_argument("checkpoint")
    ex.add_argument(
        "--to",
        choices=["hf", "ct2"],
        default="hf",
        help="hf: a Hugging Face transformers directory; ct2: a CTranslate2 model directory",
    )
    ex.add_argument("out", help="directory to write")
    ex.add_argument(
        "--quantization",
        choices=["int8", "int8_float32", "int16", "float16", "bfloat16"],
        help="ct2: store the weights in this type (default float32)",
    )
    overwrite_option(ex, "a model of the same format in OUT")
    ex.set_defaults(fn=export)


def export(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint
    from ..interop import export_hf

    ckpt = load_checkpoint(args.checkpoint)
    if args.to == "ct2":
        from ..interop.ctranslate2 import export_ct2

        out = export_ct2(ckpt, args.out, quantization=args.quantization, overwrite=args.overwrite)
        print(f"wrote a CTranslate2 model directory to {out}")
        return 0
    if args.quantization:
        raise TransformerError("--quantization applies to --to ct2 only")
    out = export_hf(ckpt, args.out, overwrite=args.overwrite)
    print(f"wrote a Hugging Face model directory to {out}")
    return 0
