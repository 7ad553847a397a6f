"""Checkpoints in and out of other libraries: `import` (Hugging Face), `export` (Hugging Face, CTranslate2, a peft
adapter) and `merge` (LoRA adapters folded into the weights)."""

from __future__ import annotations

import argparse

from ..errors import TransformerError
from .common import overwrite_option


def add_import(sub) -> None:
    im = sub.add_parser(
        "import", help="turn a Hugging Face model directory (BERT, Marian, GPT-2, Llama, Qwen, ...) into a checkpoint"
    )
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
        choices=["hf", "ct2", "peft"],
        default="hf",
        help="hf: a Hugging Face transformers directory; ct2: a CTranslate2 model directory; peft: a LoRA "
        "checkpoint's adapters as a peft adapter directory",
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
    if args.to == "peft":
        from ..interop.peft import export_adapter

        out = export_adapter(ckpt, args.out, overwrite=args.overwrite)
        print(f"wrote a peft adapter directory to {out}")
        return 0
    out = export_hf(ckpt, args.out, overwrite=args.overwrite)
    print(f"wrote a Hugging Face model directory to {out}")
    return 0


def add_merge(sub) -> None:
    mg = sub.add_parser("merge", help="fold LoRA adapters into a checkpoint's weights")
    mg.add_argument("checkpoint", help="a LoRA run's checkpoint, or any checkpoint with --adapter")
    mg.add_argument("--adapter", metavar="DIR", help="a peft adapter directory to fold in")
    mg.add_argument("--out", required=True, help="checkpoint directory to write")
    overwrite_option(mg, "a checkpoint in --out")
    mg.set_defaults(fn=merge)


def merge(args: argparse.Namespace) -> int:
    """CKPT (+ ADAPTER) -> a checkpoint whose weights hold the adapters' updates and that has no adapters."""
    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..lora import has_lora, merge_lora

    ckpt = load_checkpoint(args.checkpoint)
    if args.adapter:
        from ..interop.peft import load_adapter

        if has_lora(ckpt.model):
            raise TransformerError(f"{args.checkpoint}: already holds adapters; merge them first, then add --adapter")
        load_adapter(ckpt.model, args.adapter, ckpt.meta)
    elif not has_lora(ckpt.model):
        raise TransformerError(f"{args.checkpoint}: has no adapters to merge (name a peft adapter with --adapter)")
    merge_lora(ckpt.model)
    meta = {**ckpt.meta, "merged_adapter": str(args.adapter or args.checkpoint)}
    out = save_checkpoint(args.out, ckpt.model, ckpt.task, ckpt.tokenizers, meta, overwrite=args.overwrite)
    print(f"wrote {out}: the adapters folded into the weights")
    return 0
