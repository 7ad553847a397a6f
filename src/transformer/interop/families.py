"""One table per Hugging Face family: how its config maps to a `ModelConfig`, and its weight names to ours.

Each family gives `config(hf) -> ModelConfig` (refusing by name what our blocks cannot reproduce exactly),
`hf_config(cfg) -> dict` (the way back, refusing what the family cannot represent), and `names(cfg)`: pairs
(our name, its name, how) where how is "same", "t" (GPT-2's Conv1D stores the matrix transposed), or
"cat:N" (ours fuses N of its matrices, e.g. query, key and value: the `names` entry lists them joined by "|").
"""

from __future__ import annotations

from typing import Any, Iterator

from ..config import ModelConfig
from ..errors import CheckpointError

ACTIVATION_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                 "silu": "silu", "swish": "silu"}


def _activation(hf: dict, key: str, where: str) -> str:
    name = hf.get(key, "gelu")
    if name not in ACTIVATION_IN:
        raise CheckpointError(f"{where}: {key}={name!r} has no exact equivalent here "
                              f"(supported: {', '.join(sorted(ACTIVATION_IN))})")
    return ACTIVATION_IN[name]


def _refuse(where: str, setting: str, why: str) -> None:
    raise CheckpointError(f"{where}: {setting} cannot be reproduced exactly by this package's blocks ({why}); "
                          "refused rather than approximated")


def _layer_names(prefix: str, ours: str, table: list[tuple[str, str, str]], n: int) -> Iterator[tuple[str, str, str]]:
    for i in range(n):
        for mine, theirs, how in table:
            yield f"{ours}.{i}.{mine}", "|".join(f"{prefix}.{i}.{t}" for t in theirs.split("|")), how


# ----------------------------------------------------------------------------------------------------------
# BERT (BertModel, BertForSequenceClassification; MiniLM and sentence-transformers models are BERTs)

_BERT_LAYER = [
    ("self_attn.qkv_proj.weight", "attention.self.query.weight|attention.self.key.weight|attention.self.value.weight", "cat"),
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

    @staticmethod
    def config(hf: dict, where: str, pooling: str = "cls", normalize: bool = False, pooler: bool = True) -> ModelConfig:
        if hf.get("position_embedding_type", "absolute") != "absolute":
            _refuse(where, f"position_embedding_type={hf['position_embedding_type']!r}", "only absolute positions")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            _refuse(where, "a BERT decoder", "only the encoder")
        if hf.get("problem_type") not in (None, "single_label_classification"):
            _refuse(where, f"problem_type={hf['problem_type']!r}", "only single-label classification")
        labels = len(hf["id2label"]) if "ForSequenceClassification" in str(hf.get("architectures")) else 0
        return ModelConfig(
            arch="encoder-only", src_vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            n_heads=hf["num_attention_heads"], n_encoder_layers=hf["num_hidden_layers"],
            d_ff=hf["intermediate_size"], dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            activation=_activation(hf, "hidden_act", where), norm_first=False, final_norm=False,
            positional="learned", max_positions=hf.get("max_position_embeddings", 512),
            pad_id=hf.get("pad_token_id") or 0, layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            scale_embeddings=False, embed_norm=True, type_vocab_size=hf.get("type_vocab_size", 2),
            num_labels=labels, pooling=pooling, pooler=pooler, normalize_embeddings=normalize)

    @staticmethod
    def hf_config(cfg: ModelConfig, where: str) -> dict:
        wanted = dict(arch="encoder-only", norm_first=False, final_norm=False, positional="learned",
                      scale_embeddings=False, embed_norm=True)
        _representable(cfg, wanted, "BERT", where)
        act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}[cfg.activation]
        hf = {"model_type": "bert", "vocab_size": cfg.src_vocab_size, "hidden_size": cfg.d_model,
              "num_attention_heads": cfg.n_heads, "num_hidden_layers": cfg.n_encoder_layers,
              "intermediate_size": cfg.d_ff, "hidden_dropout_prob": cfg.dropout,
              "attention_probs_dropout_prob": cfg.attention_dropout, "hidden_act": act,
              "max_position_embeddings": cfg.max_positions, "type_vocab_size": max(cfg.type_vocab_size, 1),
              "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_id, "position_embedding_type": "absolute",
              "architectures": ["BertForSequenceClassification" if cfg.num_labels else "BertModel"]}
        if cfg.num_labels:
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        return hf

    @staticmethod
    def names(cfg: ModelConfig, prefix: str) -> list[tuple[str, str, str]]:
        p = prefix
        out = [("encoder.embed.embedding.weight", f"{p}embeddings.word_embeddings.weight", "same"),
               ("encoder.positions.embedding.weight", f"{p}embeddings.position_embeddings.weight", "same"),
               ("encoder.embed_norm.weight", f"{p}embeddings.LayerNorm.weight", "same"),
               ("encoder.embed_norm.bias", f"{p}embeddings.LayerNorm.bias", "same")]
        if cfg.type_vocab_size:
            out.append(("encoder.token_types.weight", f"{p}embeddings.token_type_embeddings.weight", "same"))
        out += _layer_names(f"{p}encoder.layer", "encoder.layers", _BERT_LAYER, cfg.n_encoder_layers)
        if cfg.pooler:
            out += [("pooler.weight", f"{p}pooler.dense.weight", "same"), ("pooler.bias", f"{p}pooler.dense.bias", "same")]
        if cfg.num_labels:
            out += [("classifier.weight", "classifier.weight", "same"), ("classifier.bias", "classifier.bias", "same")]
        return out


# ----------------------------------------------------------------------------------------------------------
# GPT-2 (GPT2LMHeadModel)

_GPT2_LAYER = [
    ("self_attn_norm.weight", "ln_1.weight", "same"), ("self_attn_norm.bias", "ln_1.bias", "same"),
    ("self_attn.qkv_proj.weight", "attn.c_attn.weight", "t"), ("self_attn.qkv_proj.bias", "attn.c_attn.bias", "same"),
    ("self_attn.out_proj.weight", "attn.c_proj.weight", "t"), ("self_attn.out_proj.bias", "attn.c_proj.bias", "same"),
    ("ff_norm.weight", "ln_2.weight", "same"), ("ff_norm.bias", "ln_2.bias", "same"),
    ("ff.linear1.weight", "mlp.c_fc.weight", "t"), ("ff.linear1.bias", "mlp.c_fc.bias", "same"),
    ("ff.linear2.weight", "mlp.c_proj.weight", "t"), ("ff.linear2.bias", "mlp.c_proj.bias", "same"),
]


class GPT2:
    model_type = "gpt2"

    @staticmethod
    def config(hf: dict, where: str, **_: Any) -> ModelConfig:
        if not hf.get("scale_attn_weights", True):
            _refuse(where, "scale_attn_weights=false", "attention is always scaled by 1/sqrt(head dim)")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            _refuse(where, "scale_attn_by_inverse_layer_idx=true", "no per-layer attention scaling")
        if hf.get("add_cross_attention"):
            _refuse(where, "add_cross_attention=true", "a decoder-only model has no cross-attention")
        d = hf["n_embd"]
        eos = hf.get("eos_token_id", 50256)
        return ModelConfig(
            arch="decoder-only", tgt_vocab_size=hf["vocab_size"], d_model=d, n_heads=hf["n_head"],
            n_decoder_layers=hf["n_layer"], d_ff=hf.get("n_inner") or 4 * d, dropout=hf.get("resid_pdrop", 0.1),
            attention_dropout=hf.get("attn_pdrop", 0.1), activation=_activation(hf, "activation_function", where),
            norm_first=True, final_norm=True, positional="learned", max_positions=hf.get("n_positions", 1024),
            tie_embeddings="decoder", pad_id=eos, layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            scale_embeddings=False, bos_id=hf.get("bos_token_id", eos), eos_id=eos)

    @staticmethod
    def hf_config(cfg: ModelConfig, where: str) -> dict:
        wanted = dict(arch="decoder-only", norm_first=True, final_norm=True, positional="learned",
                      scale_embeddings=False, tie_embeddings="decoder", output_bias=False, embed_norm=False)
        _representable(cfg, wanted, "GPT-2", where)
        act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}[cfg.activation]
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.tgt_vocab_size,
                "n_embd": cfg.d_model, "n_head": cfg.n_heads, "n_layer": cfg.n_decoder_layers, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_positions, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": cfg.attention_dropout, "activation_function": act,
                "layer_norm_epsilon": cfg.layer_norm_eps, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
                "tie_word_embeddings": True}

    @staticmethod
    def names(cfg: ModelConfig, prefix: str) -> list[tuple[str, str, str]]:
        p = prefix
        out = [("decoder.embed.embedding.weight", f"{p}wte.weight", "same"),
               ("decoder.positions.embedding.weight", f"{p}wpe.weight", "same")]
        out += _layer_names(f"{p}h", "decoder.layers", _GPT2_LAYER, cfg.n_decoder_layers)
        return out + [("decoder.norm.weight", f"{p}ln_f.weight", "same"), ("decoder.norm.bias", f"{p}ln_f.bias", "same")]


# ----------------------------------------------------------------------------------------------------------
# Marian (MarianMTModel: the OPUS-MT translators)

def _attention(theirs: str, mine: str) -> list[tuple[str, str, str]]:
    return [(f"{mine}.qkv_proj.weight", f"{theirs}.q_proj.weight|{theirs}.k_proj.weight|{theirs}.v_proj.weight", "cat"),
            (f"{mine}.qkv_proj.bias", f"{theirs}.q_proj.bias|{theirs}.k_proj.bias|{theirs}.v_proj.bias", "cat"),
            (f"{mine}.out_proj.weight", f"{theirs}.out_proj.weight", "same"),
            (f"{mine}.out_proj.bias", f"{theirs}.out_proj.bias", "same")]


_MARIAN_COMMON = [
    ("self_attn_norm.weight", "self_attn_layer_norm.weight", "same"), ("self_attn_norm.bias", "self_attn_layer_norm.bias", "same"),
    ("ff.linear1.weight", "fc1.weight", "same"), ("ff.linear1.bias", "fc1.bias", "same"),
    ("ff.linear2.weight", "fc2.weight", "same"), ("ff.linear2.bias", "fc2.bias", "same"),
    ("ff_norm.weight", "final_layer_norm.weight", "same"), ("ff_norm.bias", "final_layer_norm.bias", "same"),
]
_MARIAN_ENCODER = _attention("self_attn", "self_attn") + _MARIAN_COMMON
_MARIAN_DECODER = _MARIAN_ENCODER + [
    ("cross_attn.q_proj.weight", "encoder_attn.q_proj.weight", "same"), ("cross_attn.q_proj.bias", "encoder_attn.q_proj.bias", "same"),
    ("cross_attn.kv_proj.weight", "encoder_attn.k_proj.weight|encoder_attn.v_proj.weight", "cat"),
    ("cross_attn.kv_proj.bias", "encoder_attn.k_proj.bias|encoder_attn.v_proj.bias", "cat"),
    ("cross_attn.out_proj.weight", "encoder_attn.out_proj.weight", "same"),
    ("cross_attn.out_proj.bias", "encoder_attn.out_proj.bias", "same"),
    ("cross_attn_norm.weight", "encoder_attn_layer_norm.weight", "same"),
    ("cross_attn_norm.bias", "encoder_attn_layer_norm.bias", "same"),
]


class Marian:
    model_type = "marian"

    @staticmethod
    def config(hf: dict, where: str, **_: Any) -> ModelConfig:
        for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
            if hf.get(a) != hf.get(b):
                _refuse(where, f"{a}={hf.get(a)} with {b}={hf.get(b)}", "one value for both stacks")
        if hf.get("encoder_layerdrop") or hf.get("decoder_layerdrop"):
            pass  # layer drop only acts in training, where it is not reproduced: decoding is exact
        src_vocab = hf["vocab_size"]
        tgt_vocab = hf.get("decoder_vocab_size") or src_vocab
        shared = hf.get("share_encoder_decoder_embeddings", True)
        tied = hf.get("tie_word_embeddings", True)
        if shared and src_vocab != tgt_vocab:
            _refuse(where, "shared embeddings of two vocabulary sizes", "a shared table has one size")
        eos = hf.get("eos_token_id", 0)
        eos = eos[0] if isinstance(eos, list) else eos
        return ModelConfig(
            arch="encoder-decoder", src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab, d_model=hf["d_model"],
            n_heads=hf["encoder_attention_heads"], n_encoder_layers=hf["encoder_layers"],
            n_decoder_layers=hf["decoder_layers"], d_ff=hf["encoder_ffn_dim"], dropout=hf.get("dropout", 0.1),
            attention_dropout=hf.get("attention_dropout", 0.0), activation_dropout=hf.get("activation_dropout", 0.0),
            activation=_activation(hf, "activation_function", where), norm_first=False, final_norm=False,
            positional="sinusoidal_halves", max_positions=hf.get("max_position_embeddings", 1024),
            tie_embeddings=("all" if shared else "decoder") if tied else "none", pad_id=hf.get("pad_token_id", 58100),
            scale_embeddings=bool(hf.get("scale_embedding", False)), output_bias=True,
            bos_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 58100)), eos_id=eos, layer_norm_eps=1e-5)

    @staticmethod
    def hf_config(cfg: ModelConfig, where: str) -> dict:
        wanted = dict(arch="encoder-decoder", norm_first=False, final_norm=False, positional="sinusoidal_halves",
                      embed_norm=False, layer_norm_eps=1e-5)
        _representable(cfg, wanted, "Marian", where)
        act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "swish"}[cfg.activation]
        return {"model_type": "marian", "architectures": ["MarianMTModel"], "vocab_size": cfg.src_vocab_size,
                "decoder_vocab_size": cfg.tgt_vocab_size, "d_model": cfg.d_model,
                "encoder_layers": cfg.n_encoder_layers, "decoder_layers": cfg.n_decoder_layers,
                "encoder_attention_heads": cfg.n_heads, "decoder_attention_heads": cfg.n_heads,
                "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff, "activation_function": act,
                "dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout,
                "activation_dropout": cfg.feed_forward_dropout, "max_position_embeddings": cfg.max_positions,
                "scale_embedding": cfg.scale_embeddings, "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id,
                "forced_eos_token_id": cfg.eos_id, "decoder_start_token_id": cfg.bos_id,
                "share_encoder_decoder_embeddings": cfg.tie_embeddings == "all",
                "tie_word_embeddings": cfg.tie_embeddings != "none", "is_encoder_decoder": True}

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


FAMILIES = {"bert": Bert, "gpt2": GPT2, "marian": Marian}


def _representable(cfg: ModelConfig, wanted: dict, family: str, where: str) -> None:
    off = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    if off:
        raise CheckpointError(f"{where}: a Hugging Face {family} model cannot represent this model: {'; '.join(off)}")
