"""One table per Hugging Face family: how its config maps to a `ModelConfig`, and its weight names to ours.

Each family gives `config(keys) -> ModelConfig` (refusing by name what our blocks cannot reproduce exactly, and
any key that is missing or of the wrong type),
`hf_config(cfg) -> dict` (the way back, refusing what the family cannot represent), and `names(cfg)`: pairs
(our name, its name, how) where how is "same", "t" (GPT-2's Conv1D stores the matrix transposed), or
"cat:N" (ours fuses N of its matrices, e.g. query, key and value: the `names` entry lists them joined by "|").
`shapes(cfg)` and `stacks(cfg)` say what the weights file must hold for that config, with the keys each size
comes from: checked against the file's header before any model is built, so that a config claiming a huge
model is refused by name instead of running out of memory.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from .metadata import Keys, show

ACTIVATION_IN = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _activation(keys: Keys, key: str) -> str:
    name = keys.text(key, "gelu")
    if name not in ACTIVATION_IN:
        raise CheckpointError(
            f"{keys.where}: {key}={name!r} has no exact equivalent here (supported: {', '.join(sorted(ACTIVATION_IN))})"
        )
    return ACTIVATION_IN[name]


def _model_config(keys: Keys, theirs: dict[str, str], **fields: Any) -> ModelConfig:
    """A ModelConfig, its own refusals (a dropout out of range, d_model not divisible by n_heads, a token id
    outside the vocabulary) reported against the config.json key the value came from."""
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        ours, _, rest = str(e).partition("=")  # ConfigError messages read "field=value: why"
        value, _, why = rest.partition(": ")
        why = re.sub(r"\b(\w+)=", lambda m: f"{theirs.get(m[1], m[1])}=", why)  # "by n_heads=5": their name too
        raise keys.error(theirs.get(ours, ours), f"is {value}, which {why}") from None


# A tensor the weights file must hold: its name and its shape as (config key, size) pairs, key None for a
# size no key sets. A stack of layers: the names' prefix, the key giving the count, the count.
Shape = tuple[str, list[tuple[Any, int]]]
Stack = tuple[str, str, int]


def _refuse(where: str, setting: str, why: str) -> None:
    raise CheckpointError(
        f"{where}: {setting} cannot be reproduced exactly by this package's blocks ({why}); "
        "refused rather than approximated"
    )


def _layer_names(prefix: str, ours: str, table: list[tuple[str, str, str]], n: int) -> Iterator[tuple[str, str, str]]:
    for i in range(n):
        for mine, theirs, how in table:
            yield f"{ours}.{i}.{mine}", "|".join(f"{prefix}.{i}.{t}" for t in theirs.split("|")), how


# ----------------------------------------------------------------------------------------------------------
# BERT (BertModel, BertForSequenceClassification; MiniLM and sentence-transformers models are BERTs)

_BERT_LAYER = [
    (
        "self_attn.qkv_proj.weight",
        "attention.self.query.weight|attention.self.key.weight|attention.self.value.weight",
        "cat",
    ),
    ("self_attn.qkv_proj.bias", "attention.self.query.bias|attention.self.key.bias|attention.self.value.bias", "cat"),
    ("self_attn.out_proj.weight", "attention.output.dense.weight", "same"),
    ("self_attn.out_proj.bias", "attention.output.dense.bias", "same"),
    ("self_attn_norm.weight", "attention.output.LayerNorm.weight", "same"),
    ("self_attn_norm.bias", "attention.output.LayerNorm.bias", "same"),
    ("ff.linear1.weight", "intermediate.dense.weight", "same"),
    ("ff.linear1.bias", "intermediate.dense.bias", "same"),
    ("ff.linear2.weight", "output.dense.weight", "same"),
    ("ff.linear2.bias", "output.dense.bias", "same"),
    ("ff_norm.weight", "output.LayerNorm.weight", "same"),
    ("ff_norm.bias", "output.LayerNorm.bias", "same"),
]


class Bert:
    model_type = "bert"

    THEIRS = {
        "src_vocab_size": "vocab_size",
        "d_model": "hidden_size",
        "n_heads": "num_attention_heads",
        "n_encoder_layers": "num_hidden_layers",
        "d_ff": "intermediate_size",
        "dropout": "hidden_dropout_prob",
        "attention_dropout": "attention_probs_dropout_prob",
        "max_positions": "max_position_embeddings",
        "pad_id": "pad_token_id",
        "num_labels": "id2label",
    }

    @staticmethod
    def config(k: Keys, pooling: str = "cls", normalize: bool = False, pooler: bool = True) -> ModelConfig:
        where = k.where
        if (positions := k.text("position_embedding_type", "absolute")) != "absolute":
            _refuse(where, f"position_embedding_type={positions!r}", "only absolute positions")
        if k.flag("is_decoder", False) or k.flag("add_cross_attention", False):
            _refuse(where, "a BERT decoder", "only the encoder")
        if (problem := k.text("problem_type", None)) not in (None, "single_label_classification"):
            _refuse(where, f"problem_type={problem!r}", "only single-label classification")
        labels = len(Bert.labels(k)) if Bert.classifies(k) else 0
        return _model_config(
            k,
            Bert.THEIRS,
            arch="encoder-only",
            src_vocab_size=k.integer("vocab_size"),
            d_model=k.integer("hidden_size"),
            n_heads=k.integer("num_attention_heads"),
            n_encoder_layers=k.integer("num_hidden_layers"),
            d_ff=k.integer("intermediate_size"),
            dropout=k.number("hidden_dropout_prob", 0.1),
            attention_dropout=k.number("attention_probs_dropout_prob", 0.1),
            activation=_activation(k, "hidden_act"),
            norm_first=False,
            final_norm=False,
            positional="learned",
            max_positions=k.integer("max_position_embeddings", 512),
            pad_id=k.token_id("pad_token_id", 0),
            layer_norm_eps=k.number("layer_norm_eps", 1e-12),
            scale_embeddings=False,
            embed_norm=True,
            type_vocab_size=k.integer("type_vocab_size", 2, low=0),
            num_labels=labels,
            pooling=pooling,
            pooler=pooler,
            normalize_embeddings=normalize,
        )

    @staticmethod
    def classifies(k: Keys) -> bool:
        return any("ForSequenceClassification" in a for a in k.texts("architectures", []))

    @staticmethod
    def labels(k: Keys) -> list[str]:
        """A classifier's label names, in id order: id2label must map "0" .. "N-1" to names."""
        id2label = k.mapping("id2label")
        names = [id2label.get(str(i)) for i in range(len(id2label))]
        if not names or not all(isinstance(n, str) for n in names):
            raise k.error("id2label", f'must map "0" .. "N-1" to label names, got {show(id2label)}')
        return names

    @staticmethod
    def hf_config(cfg: ModelConfig, where: str) -> dict:
        wanted = dict(
            arch="encoder-only",
            norm_first=False,
            final_norm=False,
            positional="learned",
            scale_embeddings=False,
            embed_norm=True,
        )
        _representable(cfg, wanted, "BERT", where)
        act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}[cfg.activation]
        hf = {
            "model_type": "bert",
            "vocab_size": cfg.src_vocab_size,
            "hidden_size": cfg.d_model,
            "num_attention_heads": cfg.n_heads,
            "num_hidden_layers": cfg.n_encoder_layers,
            "intermediate_size": cfg.d_ff,
            "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.attention_dropout,
            "hidden_act": act,
            "max_position_embeddings": cfg.max_positions,
            "type_vocab_size": max(cfg.type_vocab_size, 1),
            "layer_norm_eps": cfg.layer_norm_eps,
            "pad_token_id": cfg.pad_id,
            "position_embedding_type": "absolute",
            "architectures": ["BertForSequenceClassification" if cfg.num_labels else "BertModel"],
        }
        if cfg.num_labels:
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        return hf

    @staticmethod
    def names(cfg: ModelConfig, prefix: str) -> list[tuple[str, str, str]]:
        p = prefix
        out = [
            ("encoder.embed.embedding.weight", f"{p}embeddings.word_embeddings.weight", "same"),
            ("encoder.positions.embedding.weight", f"{p}embeddings.position_embeddings.weight", "same"),
            ("encoder.embed_norm.weight", f"{p}embeddings.LayerNorm.weight", "same"),
            ("encoder.embed_norm.bias", f"{p}embeddings.LayerNorm.bias", "same"),
        ]
        if cfg.type_vocab_size:
            out.append(("encoder.token_types.weight", f"{p}embeddings.token_type_embeddings.weight", "same"))
        out += _layer_names(f"{p}encoder.layer", "encoder.layers", _BERT_LAYER, cfg.n_encoder_layers)
        if cfg.pooler:
            out += [
                ("pooler.weight", f"{p}pooler.dense.weight", "same"),
                ("pooler.bias", f"{p}pooler.dense.bias", "same"),
            ]
        if cfg.num_labels:
            out += [("classifier.weight", "classifier.weight", "same"), ("classifier.bias", "classifier.bias", "same")]
        return out

    @staticmethod
    def shapes(cfg: ModelConfig, p: str) -> list[Shape]:
        h = ("hidden_size", cfg.d_model)
        out = [
            (f"{p}embeddings.word_embeddings.weight", [("vocab_size", cfg.src_vocab_size), h]),
            (f"{p}embeddings.position_embeddings.weight", [("max_position_embeddings", cfg.max_positions), h]),
            (f"{p}encoder.layer.0.intermediate.dense.weight", [("intermediate_size", cfg.d_ff), h]),
        ]
        if cfg.type_vocab_size:
            types = [("type_vocab_size", cfg.type_vocab_size), h]
            out.append((f"{p}embeddings.token_type_embeddings.weight", types))
        if cfg.num_labels:
            out.append(("classifier.weight", [("id2label", cfg.num_labels), h]))
        return out

    @staticmethod
    def stacks(cfg: ModelConfig, p: str) -> list[Stack]:
        return [(f"{p}encoder.layer.", "num_hidden_layers", cfg.n_encoder_layers)]


# ----------------------------------------------------------------------------------------------------------
# GPT-2 (GPT2LMHeadModel)

_GPT2_LAYER = [
    ("self_attn_norm.weight", "ln_1.weight", "same"),
    ("self_attn_norm.bias", "ln_1.bias", "same"),
    ("self_attn.qkv_proj.weight", "attn.c_attn.weight", "t"),
    ("self_attn.qkv_proj.bias", "attn.c_attn.bias", "same"),
    ("self_attn.out_proj.weight", "attn.c_proj.weight", "t"),
    ("self_attn.out_proj.bias", "attn.c_proj.bias", "same"),
    ("ff_norm.weight", "ln_2.weight", "same"),
    ("ff_norm.bias", "ln_2.bias", "same"),
    ("ff.linear1.weight", "mlp.c_fc.weight", "t"),
    ("ff.linear1.bias", "mlp.c_fc.bias", "same"),
    ("ff.linear2.weight", "mlp.c_proj.weight", "t"),
    ("ff.linear2.bias", "mlp.c_proj.bias", "same"),
]


class GPT2:
    model_type = "gpt2"

    THEIRS = {
        "tgt_vocab_size": "vocab_size",
        "d_model": "n_embd",
        "n_heads": "n_head",
        "n_decoder_layers": "n_layer",
        "d_ff": "n_inner",
        "dropout": "resid_pdrop",
        "attention_dropout": "attn_pdrop",
        "max_positions": "n_positions",
        "pad_id": "eos_token_id",
        "layer_norm_eps": "layer_norm_epsilon",
        "bos_id": "bos_token_id",
        "eos_id": "eos_token_id",
    }

    @staticmethod
    def config(k: Keys, **_: Any) -> ModelConfig:
        where = k.where
        if not k.flag("scale_attn_weights", True):
            _refuse(where, "scale_attn_weights=false", "attention is always scaled by 1/sqrt(head dim)")
        if k.flag("scale_attn_by_inverse_layer_idx", False):
            _refuse(where, "scale_attn_by_inverse_layer_idx=true", "no per-layer attention scaling")
        if k.flag("add_cross_attention", False):
            _refuse(where, "add_cross_attention=true", "a decoder-only model has no cross-attention")
        d = k.integer("n_embd")
        eos = k.token_id("eos_token_id", 50256, several=True)
        return _model_config(
            k,
            GPT2.THEIRS,
            arch="decoder-only",
            tgt_vocab_size=k.integer("vocab_size"),
            d_model=d,
            n_heads=k.integer("n_head"),
            n_decoder_layers=k.integer("n_layer"),
            d_ff=k.integer("n_inner", 4 * d),
            dropout=k.number("resid_pdrop", 0.1),
            attention_dropout=k.number("attn_pdrop", 0.1),
            activation=_activation(k, "activation_function"),
            norm_first=True,
            final_norm=True,
            positional="learned",
            max_positions=k.integer("n_positions", 1024),
            tie_embeddings="decoder",
            pad_id=eos,
            layer_norm_eps=k.number("layer_norm_epsilon", 1e-5),
            scale_embeddings=False,
            bos_id=k.token_id("bos_token_id", eos, several=True),
            eos_id=eos,
        )

    @staticmethod
    def hf_config(cfg: ModelConfig, where: str) -> dict:
        wanted = dict(
            arch="decoder-only",
            norm_first=True,
            final_norm=True,
            positional="learned",
            scale_embeddings=False,
            tie_embeddings="decoder",
            output_bias=False,
            embed_norm=False,
        )
        _representable(cfg, wanted, "GPT-2", where)
        act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}[cfg.activation]
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.tgt_vocab_size,
            "n_embd": cfg.d_model,
            "n_head": cfg.n_heads,
            "n_layer": cfg.n_decoder_layers,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.max_positions,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.attention_dropout,
            "activation_function": act,
            "layer_norm_epsilon": cfg.layer_norm_eps,
            "bos_token_id": cfg.bos_id,
            "eos_token_id": cfg.eos_id,
            "tie_word_embeddings": True,
        }

    @staticmethod
    def names(cfg: ModelConfig, prefix: str) -> list[tuple[str, str, str]]:
        p = prefix
        out = [
            ("decoder.embed.embedding.weight", f"{p}wte.weight", "same"),
            ("decoder.positions.embedding.weight", f"{p}wpe.weight", "same"),
        ]
        out += _layer_names(f"{p}h", "decoder.layers", _GPT2_LAYER, cfg.n_decoder_layers)
        return out + [
            ("decoder.norm.weight", f"{p}ln_f.weight", "same"),
            ("decoder.norm.bias", f"{p}ln_f.bias", "same"),
        ]

    @staticmethod
    def shapes(cfg: ModelConfig, p: str) -> list[Shape]:
        d = ("n_embd", cfg.d_model)
        return [
            (f"{p}wte.weight", [("vocab_size", cfg.tgt_vocab_size), d]),
            (f"{p}wpe.weight", [("n_positions", cfg.max_positions), d]),
            (f"{p}h.0.mlp.c_fc.weight", [d, ("n_inner", cfg.d_ff)]),
        ]  # Conv1D: stored transposed

    @staticmethod
    def stacks(cfg: ModelConfig, p: str) -> list[Stack]:
        return [(f"{p}h.", "n_layer", cfg.n_decoder_layers)]


# ----------------------------------------------------------------------------------------------------------
# Marian (MarianMTModel: the OPUS-MT translators)


def _attention(theirs: str, mine: str) -> list[tuple[str, str, str]]:
    return [
        (f"{mine}.qkv_proj.weight", f"{theirs}.q_proj.weight|{theirs}.k_proj.weight|{theirs}.v_proj.weight", "cat"),
        (f"{mine}.qkv_proj.bias", f"{theirs}.q_proj.bias|{theirs}.k_proj.bias|{theirs}.v_proj.bias", "cat"),
        (f"{mine}.out_proj.weight", f"{theirs}.out_proj.weight", "same"),
        (f"{mine}.out_proj.bias", f"{theirs}.out_proj.bias", "same"),
    ]


_MARIAN_COMMON = [
    ("self_attn_norm.weight", "self_attn_layer_norm.weight", "same"),
    ("self_attn_norm.bias", "self_attn_layer_norm.bias", "same"),
    ("ff.linear1.weight", "fc1.weight", "same"),
    ("ff.linear1.bias", "fc1.bias", "same"),
    ("ff.linear2.weight", "fc2.weight", "same"),
    ("ff.linear2.bias", "fc2.bias", "same"),
    ("ff_norm.weight", "final_layer_norm.weight", "same"),
    ("ff_norm.bias", "final_layer_norm.bias", "same"),
]
_MARIAN_ENCODER = _attention("self_attn", "self_attn") + _MARIAN_COMMON
_MARIAN_DECODER = _MARIAN_ENCODER + [
    ("cross_attn.q_proj.weight", "encoder_attn.q_proj.weight", "same"),
    ("cross_attn.q_proj.bias", "encoder_attn.q_proj.bias", "same"),
    ("cross_attn.kv_proj.weight", "encoder_attn.k_proj.weight|encoder_attn.v_proj.weight", "cat"),
    ("cross_attn.kv_proj.bias", "encoder_attn.k_proj.bias|encoder_attn.v_proj.bias", "cat"),
    ("cross_attn.out_proj.weight", "encoder_attn.out_proj.weight", "same"),
    ("cross_attn.out_proj.bias", "encoder_attn.out_proj.bias", "same"),
    ("cross_attn_norm.weight", "encoder_attn_layer_norm.weight", "same"),
    ("cross_attn_norm.bias", "encoder_attn_layer_norm.bias", "same"),
]


class Marian:
    model_type = "marian"

    THEIRS = {
        "src_vocab_size": "vocab_size",
        "tgt_vocab_size": "decoder_vocab_size",
        "d_model": "d_model",
        "n_heads": "encoder_attention_heads",
        "n_encoder_layers": "encoder_layers",
        "n_decoder_layers": "decoder_layers",
        "d_ff": "encoder_ffn_dim",
        "max_positions": "max_position_embeddings",
        "pad_id": "pad_token_id",
        "bos_id": "decoder_start_token_id",
        "eos_id": "eos_token_id",
    }

    @staticmethod
    def config(k: Keys, **_: Any) -> ModelConfig:
        where = k.where
        for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
            if (x := k.integer(a)) != (y := k.integer(b)):
                _refuse(where, f"{a}={x} with {b}={y}", "one value for both stacks")
        # encoder_layerdrop and decoder_layerdrop are not read: layer drop only acts in training, where it is not
        # reproduced; decoding is exact
        src_vocab = k.integer("vocab_size")
        tgt_vocab = k.integer("decoder_vocab_size", src_vocab)
        shared = k.flag("share_encoder_decoder_embeddings", True)
        tied = k.flag("tie_word_embeddings", True)
        if shared and src_vocab != tgt_vocab:
            _refuse(where, "shared embeddings of two vocabulary sizes", "a shared table has one size")
        pad = k.token_id("pad_token_id", 58100)
        return _model_config(
            k,
            Marian.THEIRS,
            arch="encoder-decoder",
            src_vocab_size=src_vocab,
            tgt_vocab_size=tgt_vocab,
            d_model=k.integer("d_model"),
            n_heads=k.integer("encoder_attention_heads"),
            n_encoder_layers=k.integer("encoder_layers"),
            n_decoder_layers=k.integer("decoder_layers"),
            d_ff=k.integer("encoder_ffn_dim"),
            dropout=k.number("dropout", 0.1),
            attention_dropout=k.number("attention_dropout", 0.0),
            activation_dropout=k.number("activation_dropout", 0.0),
            activation=_activation(k, "activation_function"),
            norm_first=False,
            final_norm=False,
            positional="sinusoidal_halves",
            max_positions=k.integer("max_position_embeddings", 1024),
            tie_embeddings=("all" if shared else "decoder") if tied else "none",
            pad_id=pad,
            scale_embeddings=k.flag("scale_embedding", False),
            output_bias=True,
            bos_id=k.token_id("decoder_start_token_id", pad),
            eos_id=k.token_id("eos_token_id", 0, several=True),
            layer_norm_eps=1e-5,
        )

    @staticmethod
    def hf_config(cfg: ModelConfig, where: str) -> dict:
        wanted = dict(
            arch="encoder-decoder",
            norm_first=False,
            final_norm=False,
            positional="sinusoidal_halves",
            embed_norm=False,
            layer_norm_eps=1e-5,
        )
        _representable(cfg, wanted, "Marian", where)
        act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "swish"}[cfg.activation]
        return {
            "model_type": "marian",
            "architectures": ["MarianMTModel"],
            "vocab_size": cfg.src_vocab_size,
            "decoder_vocab_size": cfg.tgt_vocab_size,
            "d_model": cfg.d_model,
            "encoder_layers": cfg.n_encoder_layers,
            "decoder_layers": cfg.n_decoder_layers,
            "encoder_attention_heads": cfg.n_heads,
            "decoder_attention_heads": cfg.n_heads,
            "encoder_ffn_dim": cfg.d_ff,
            "decoder_ffn_dim": cfg.d_ff,
            "activation_function": act,
            "dropout": cfg.dropout,
            "attention_dropout": cfg.attention_dropout,
            "activation_dropout": cfg.feed_forward_dropout,
            "max_position_embeddings": cfg.max_positions,
            "scale_embedding": cfg.scale_embeddings,
            "pad_token_id": cfg.pad_id,
            "eos_token_id": cfg.eos_id,
            "forced_eos_token_id": cfg.eos_id,
            "decoder_start_token_id": cfg.bos_id,
            "share_encoder_decoder_embeddings": cfg.tie_embeddings == "all",
            "tie_word_embeddings": cfg.tie_embeddings != "none",
            "is_encoder_decoder": True,
        }

    @staticmethod
    def names(cfg: ModelConfig, prefix: str) -> list[tuple[str, str, str]]:
        p = prefix
        out = [("encoder.embed.embedding.weight", f"{p}encoder.embed_tokens.weight", "same")]
        if cfg.tie_embeddings != "all":
            out.append(("decoder.embed.embedding.weight", f"{p}decoder.embed_tokens.weight", "same"))
        out += _layer_names(f"{p}encoder.layers", "encoder.layers", _MARIAN_ENCODER, cfg.n_encoder_layers)
        out += _layer_names(f"{p}decoder.layers", "decoder.layers", _MARIAN_DECODER, cfg.n_decoder_layers)
        out.append(("output.bias", "final_logits_bias", "row"))
        if cfg.tie_embeddings == "none":
            out.append(("output.weight", "lm_head.weight", "same"))
        return out

    @staticmethod
    def shapes(cfg: ModelConfig, p: str) -> list[Shape]:
        # the positions are sinusoids, computed rather than stored: max_position_embeddings sizes no tensor
        d = ("d_model", cfg.d_model)
        return [
            (f"{p}encoder.embed_tokens.weight", [("vocab_size", cfg.src_vocab_size), d]),
            ("final_logits_bias", [(None, 1), ("decoder_vocab_size", cfg.tgt_vocab_size)]),
            (f"{p}encoder.layers.0.fc1.weight", [("encoder_ffn_dim", cfg.d_ff), d]),
        ]

    @staticmethod
    def stacks(cfg: ModelConfig, p: str) -> list[Stack]:
        return [
            (f"{p}encoder.layers.", "encoder_layers", cfg.n_encoder_layers),
            (f"{p}decoder.layers.", "decoder_layers", cfg.n_decoder_layers),
        ]


FAMILIES = {"bert": Bert, "gpt2": GPT2, "marian": Marian}


def _representable(cfg: ModelConfig, wanted: dict, family: str, where: str) -> None:
    off = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    if off:
        raise CheckpointError(f"{where}: a Hugging Face {family} model cannot represent this model: {'; '.join(off)}")
