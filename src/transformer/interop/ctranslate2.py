"""Export an encoder-decoder checkpoint to CTranslate2, the C++ engine practitioners deploy translators with
(`pip install ctranslate2`), through its own specification classes.

    export_ct2(load_checkpoint("runs/m30k/averaged"), "m30k-ct2", quantization="int8")
    ctranslate2.Translator("m30k-ct2").translate_batch([["▁Two", "▁dogs", ...]])

The positional encodings are written out as a table (so any layout, sinusoidal or learned, is exact), the
vocabulary as the tokenizer's token strings. What CTranslate2's Transformer cannot express is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from ..files import check_output_dir, foreign_entries, new_directory

_ACTIVATIONS = {"relu": "RELU", "gelu": "GELU", "gelu_tanh": "GELUTanh", "silu": "SWISH"}


# What CTranslate2's converter writes into a model directory (and so what `overwrite` may replace)
CT2_FILES = {
    "model.bin",
    "config.json",
    "shared_vocabulary.json",
    "source_vocabulary.json",
    "target_vocabulary.json",
    "shared_vocabulary.txt",
    "source_vocabulary.txt",
    "target_vocabulary.txt",
    "vocabulary.json",
    "vocabulary.txt",
}


def _not_a_ct2_model(directory: Path) -> Optional[str]:
    """For `files.check_output_dir`: None when `directory` holds a CTranslate2 model and nothing else."""
    if not (directory / "model.bin").is_file():
        return "no model.bin of a CTranslate2 model"
    return foreign_entries(directory, lambda name: name in CT2_FILES)


def export_ct2(
    ckpt: Checkpoint,
    out: str | Path,
    quantization: Optional[str] = None,
    max_positions: int = 1024,
    overwrite: bool = False,
) -> Path:
    """Write `ckpt` as a CTranslate2 model directory (`quantization`: None for float32, or "int8", ...). `out`
    is written whole or not at all; it must be new or empty, or hold a CTranslate2 model (replaced with
    `overwrite`): the converter itself would delete whatever `out` held."""
    try:
        import ctranslate2
        from ctranslate2.specs import common_spec, transformer_spec
    except ImportError:
        raise CheckpointError("exporting to CTranslate2 needs it installed: pip install ctranslate2") from None
    cfg, where = ckpt.config, str(ckpt.path or "checkpoint")
    _check(cfg, where)
    check_output_dir(out, "CTranslate2 model", _not_a_ct2_model, overwrite)  # before the work, not after it
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.n_encoder_layers, cfg.n_decoder_layers),
        cfg.n_heads,
        pre_norm=cfg.norm_first,
        no_final_norm=cfg.norm_first and not cfg.final_norm,
        activation=getattr(common_spec.Activation, _ACTIVATIONS[cfg.activation]),
    )
    weights = {k: v.detach().float().cpu().numpy() for k, v in ckpt.model.state_dict().items()}
    model = ckpt.model
    n = max(max_positions, cfg.max_source_len or 0)
    for side, stack in (("encoder", spec.encoder), ("decoder", spec.decoder)):
        module = getattr(model, side)
        stack.scale_embeddings = module.embed.scale
        emb = weights[f"{side}.embed.embedding.weight"]
        if isinstance(stack.embeddings, list):
            stack.embeddings[0].weight = emb
        else:
            stack.embeddings.weight = emb
        stack.position_encodings.encodings = _positions(module.positions, n)
        if cfg.norm_first and cfg.final_norm:
            _norm(stack.layer_norm, weights, f"{side}.norm")
        for i, layer in enumerate(stack.layer):
            p = f"{side}.layers.{i}"
            _attention(layer.self_attention, weights, f"{p}.self_attn", [f"{p}.self_attn.qkv_proj"])
            _norm(layer.self_attention.layer_norm, weights, f"{p}.self_attn_norm")
            if side == "decoder":
                _attention(
                    layer.attention, weights, f"{p}.cross_attn", [f"{p}.cross_attn.q_proj", f"{p}.cross_attn.kv_proj"]
                )
                _norm(layer.attention.layer_norm, weights, f"{p}.cross_attn_norm")
            _linear(layer.ffn.linear_0, weights, f"{p}.ff.linear1")
            _linear(layer.ffn.linear_1, weights, f"{p}.ff.linear2")
            _norm(layer.ffn.layer_norm, weights, f"{p}.ff_norm")
    _linear(spec.decoder.projection, weights, "output")
    src, tgt = ckpt.tokenizers["src"], ckpt.tokenizers["tgt"]
    spec.register_source_vocabulary(_tokens(src, cfg.src_vocab_size, where))
    spec.register_target_vocabulary(_tokens(tgt, cfg.tgt_vocab_size, where))
    spec.config.bos_token = tgt.token_text(cfg.bos_id)
    spec.config.decoder_start_token = tgt.token_text(cfg.bos_id)
    spec.config.eos_token = tgt.token_text(cfg.eos_id)
    spec.config.unk_token = _unk(tgt)
    spec.config.layer_norm_epsilon = cfg.layer_norm_eps

    class _Converter(ctranslate2.converters.Converter):
        def _load(self):
            return spec

    with new_directory(out, "CTranslate2 model", _not_a_ct2_model, overwrite) as tmp:
        # force: the converter may replace our own empty temporary directory, never `out`
        _Converter().convert(str(tmp), quantization=quantization, force=True)
    return Path(out)


def _check(cfg, where: str) -> None:
    off = []
    if cfg.lora is not None:
        off.append("unmerged LoRA adapters (fold them in first: transformer merge)")
    if cfg.arch != "encoder-decoder":
        off.append(f"arch={cfg.arch!r} (an encoder-decoder only)")
    if not cfg.norm_first and cfg.final_norm:
        off.append("final_norm with post-norm (no final LayerNorm after post-norm layers)")
    if cfg.embed_norm or cfg.type_vocab_size:
        off.append("embedding LayerNorm or token types")
    classic = dict(positional=("sinusoidal", "sinusoidal_halves", "learned"), norm=("layernorm",),
                   feed_forward=("plain",), qk_norm=(False,), sliding_window=(0,))  # fmt: skip
    off += [f"{k}={getattr(cfg, k)!r}" for k, allowed in classic.items() if getattr(cfg, k) not in allowed]
    if cfg.kv_heads != cfg.n_heads or cfg.head_size * cfg.n_heads != cfg.d_model:
        off.append("grouped-query attention or a head_dim other than d_model / n_heads")
    if not (cfg.qkv_bias and cfg.out_bias and cfg.ffn_bias):
        off.append("projections without biases")
    if off:
        raise CheckpointError(f"{where}: CTranslate2's Transformer cannot represent this model: {'; '.join(off)}")


def _positions(module, n: int):
    table = module.embedding.weight if hasattr(module, "embedding") else None
    if table is None:
        module(torch.zeros(1, n, module.d_model))  # grows the sinusoid table to n positions
        table = module.table
    return table[:n].detach().float().cpu().numpy()


def _linear(spec, weights: dict, name: str) -> None:
    spec.weight = weights[f"{name}.weight"]
    if f"{name}.bias" in weights:
        spec.bias = weights[f"{name}.bias"]


def _norm(spec, weights: dict, name: str) -> None:
    spec.gamma, spec.beta = weights[f"{name}.weight"], weights[f"{name}.bias"]


def _attention(spec, weights: dict, name: str, inputs: list[str]) -> None:
    """CTranslate2's attention: linear[0] the fused query-key-value (self) or the query (cross), linear[1] the
    fused key-value (cross), linear[-1] the output projection: the same fusions as ours."""
    for i, linear in enumerate(inputs):
        _linear(spec.linear[i], weights, linear)
    _linear(spec.linear[-1], weights, f"{name}.out_proj")


def _tokens(tok, size: int, where: str) -> list[str]:
    tokens = [tok.token_text(i) for i in range(size)]
    if len(set(tokens)) != len(tokens):
        raise CheckpointError(f"{where}: the vocabulary has repeated token strings; CTranslate2 needs unique ones")
    return tokens


def _unk(tok) -> str:
    for name in ("<unk>", "[UNK]"):
        if name in (tok.token_text(i) for i in range(min(8, tok.vocab_size))):
            return name
    return "<unk>"
