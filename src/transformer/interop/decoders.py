"""Today's decoder-only families: Llama (2, 3, SmolLM-style), Qwen2, Qwen3, Mistral, Gemma and Phi-3.

They share one shape (pre-norm RMSNorm blocks, rotary positions, a gated feed-forward, grouped-query attention,
a final norm, usually no biases) and differ in a few settings, which one `DecoderFamily` per family records:
which biases exist, QK-norm, Gemma's 1 + weight norm and scaled embeddings, Mistral's sliding window, Phi-3's
fused projections, the defaults of keys a config may leave out. Reading a config refuses by name what the
blocks cannot reproduce exactly (an unknown rope scaling, a quantised checkpoint, per-layer sliding windows).

Configs are read in both forms `transformers` has written: `rope_theta` + `rope_scaling` (up to v4) and
`rope_parameters` (v5). Exports write the first form, which both read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..config import ModelConfig
from ..errors import CheckpointError
from .families import (
    ACTIVATION_IN,
    Shape,
    Stack,
    _activation,
    _layer_names,
    _model_config,
    _refuse,
    _representable,
)
from .metadata import Keys, show

# families whose blocks this package cannot reproduce, and why: refused by name
REFUSED = {
    "gemma2": "Gemma 2 soft-caps attention and output logits and normalises after each sublayer too",
    "gemma3": "Gemma 3 soft-caps logits, normalises after each sublayer and alternates local and global layers",
    "gemma3_text": "Gemma 3 soft-caps logits, normalises after each sublayer and alternates local and global layers",
    "phi": "Phi-1/2 use parallel attention and feed-forward with LayerNorm",
    "mixtral": "Mixtral's feed-forward is a mixture of experts",
    "qwen2_moe": "Qwen2-MoE's feed-forward is a mixture of experts",
    "qwen3_moe": "Qwen3-MoE's feed-forward is a mixture of experts",
}

THEIRS = {
    "tgt_vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "n_decoder_layers": "num_hidden_layers",
    "d_ff": "intermediate_size",
    "head_dim": "head_dim",
    "max_positions": "max_position_embeddings",
    "layer_norm_eps": "rms_norm_eps",
    "pad_id": "pad_token_id",
    "bos_id": "bos_token_id",
    "eos_id": "eos_token_id",
    "sliding_window": "sliding_window",
}

_ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3"}


@dataclass(frozen=True)
class DecoderFamily:
    """One family's settings. `biases`: "llama" (attention_bias on q/k/v/o, mlp_bias on the feed-forward),
    "qwen2" (q/k/v only, always) or "none"; `window`: whether the config's sliding_window applies (Mistral,
    Phi-3) or must be off (Qwen's use_sliding_window, layer by layer, is refused)."""

    model_type: str
    architecture: str
    tied: bool = False  # tie_word_embeddings when the config leaves it out
    head_dim: Optional[int] = None  # head_dim when the config leaves it out (None: hidden_size / heads)
    biases: str = "llama"
    qk_norm: bool = False
    gemma: bool = False  # 1 + weight RMSNorm, embeddings scaled by sqrt(hidden_size), GeLU (tanh) by default
    window: bool = False
    fused: bool = False  # Phi-3 stores q/k/v as one qkv_proj and gate/up as one gate_up_proj

    # ---------------------------------------------------------------------------------------------- reading

    def config(self, k: Keys, **_: Any) -> ModelConfig:
        self._refusals(k)
        hidden, heads = k.integer("hidden_size"), k.integer("num_attention_heads")
        head_dim = k.integer("head_dim", self.head_dim or (hidden // heads if hidden % heads == 0 else None))
        if head_dim is None:
            raise k.error("head_dim", f"is missing, and hidden_size={hidden} is not divisible by {heads} heads")
        eos = k.token_ids("eos_token_id", [])
        qkv, out, ffn = self._biases(k)
        act_key = "hidden_activation" if self.gemma and k.data.get("hidden_activation") is not None else "hidden_act"
        activation = "gelu_tanh" if self.gemma and k.text(act_key, "gelu") == "gelu" else _activation(k, act_key)
        bos = k.token_id("bos_token_id", eos[0] if eos else 1)
        return _model_config(
            k,
            THEIRS,
            arch="decoder-only",
            tgt_vocab_size=k.integer("vocab_size"),
            d_model=hidden,
            n_heads=heads,
            n_kv_heads=k.integer("num_key_value_heads", heads),
            head_dim=head_dim,
            n_decoder_layers=k.integer("num_hidden_layers"),
            d_ff=k.integer("intermediate_size"),
            dropout=0.0,
            attention_dropout=k.number("attention_dropout", 0.0),
            activation=activation,
            feed_forward="gated",
            norm="gemma_rmsnorm" if self.gemma else "rmsnorm",
            layer_norm_eps=k.number("rms_norm_eps", 1e-6),
            norm_first=True,
            final_norm=True,
            max_positions=k.integer("max_position_embeddings", 2048),
            tie_embeddings="decoder" if k.flag("tie_word_embeddings", self.tied) else "none",
            scale_embeddings=self.gemma,
            pad_id=k.token_id("pad_token_id", eos[0] if eos else 0),
            bos_id=bos,
            eos_id=eos[0] if eos else bos,
            extra_eos_ids=eos[1:],
            qk_norm=self.qk_norm,
            qkv_bias=qkv,
            out_bias=out,
            ffn_bias=ffn,
            sliding_window=(k.integer("sliding_window", 0, low=0) if self.window else 0),
            **_rope(k, head_dim),
        )

    def _refusals(self, k: Keys) -> None:
        where = k.where
        if k.data.get("quantization_config") is not None:
            method = show(k.mapping("quantization_config").get("quant_method", "?"))
            _refuse(where, f"quantization_config (quant_method={method})", "quantised weights are not read")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if k.data.get(key) is not None:
                _refuse(where, f"{key}={show(k.data[key])}", "no soft-capping of logits")
        if not self.window and k.flag("use_sliding_window", False):
            _refuse(where, "use_sliding_window=true", "windows that differ from layer to layer")
        layer_types = k.texts("layer_types", [])
        if not self.window and "sliding_attention" in layer_types:
            _refuse(where, "layer_types with 'sliding_attention'", "windows that differ from layer to layer")

    def _biases(self, k: Keys) -> tuple[bool, bool, bool]:
        """(q/k/v, output projection, feed-forward) biases."""
        if self.biases == "qwen2":
            return True, False, False
        if self.biases == "none":
            return False, False, False
        attention = k.flag("attention_bias", False)
        return attention, attention, k.flag("mlp_bias", False)

    # ---------------------------------------------------------------------------------------------- writing

    def hf_config(self, cfg: ModelConfig, where: str) -> dict:
        wanted = dict(
            arch="decoder-only",
            norm_first=True,
            final_norm=True,
            positional="rope",
            norm="gemma_rmsnorm" if self.gemma else "rmsnorm",
            feed_forward="gated",
            scale_embeddings=self.gemma,
            qk_norm=self.qk_norm,
            output_bias=False,
            embed_norm=False,
            type_vocab_size=0,
            tie_embeddings=cfg.tie_embeddings if cfg.tie_embeddings != "all" else "decoder",
        )
        if self.biases == "qwen2":
            wanted.update(qkv_bias=True, out_bias=False, ffn_bias=False)
        elif self.biases == "none":
            wanted.update(qkv_bias=False, out_bias=False, ffn_bias=False)
        else:
            wanted.update(out_bias=cfg.qkv_bias)
        if not self.window:
            wanted["sliding_window"] = 0
        if self.model_type != "phi3":
            wanted["rope_fraction"] = 1.0
        _representable(cfg, wanted, self.architecture, where)
        act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}[cfg.activation]
        hf = {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "vocab_size": cfg.tgt_vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.n_decoder_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_size,
            "hidden_act": act,
            "max_position_embeddings": cfg.max_positions,
            "rms_norm_eps": cfg.layer_norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings != "none",
            "attention_dropout": cfg.attention_dropout,
            "bos_token_id": cfg.bos_id,
            "eos_token_id": cfg.eos_ids if len(cfg.eos_ids) > 1 else cfg.eos_id,
            "pad_token_id": cfg.pad_id,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": _rope_scaling_out(cfg),
        }
        if self.biases == "llama":
            hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.ffn_bias)
        if self.window:
            hf["sliding_window"] = cfg.sliding_window or None
        if self.model_type in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = False
        if self.model_type == "phi3":
            hf.update(partial_rotary_factor=cfg.rope_fraction, resid_pdrop=0.0, embd_pdrop=0.0)
        return hf

    # ---------------------------------------------------------------------------------------------- weights

    def names(self, cfg: ModelConfig, prefix: str) -> list[tuple[str, str, str]]:
        p = prefix
        if self.fused:
            layer = [("self_attn.qkv_proj.weight", "self_attn.qkv_proj.weight", "same")]
        else:
            qkv = "|".join(f"self_attn.{x}_proj.weight" for x in "qkv")
            layer = [("self_attn.qkv_proj.weight", qkv, "cat")]
        if cfg.qkv_bias:
            layer.append(("self_attn.qkv_proj.bias", "|".join(f"self_attn.{x}_proj.bias" for x in "qkv"), "cat"))
        layer.append(("self_attn.out_proj.weight", "self_attn.o_proj.weight", "same"))
        if cfg.out_bias:
            layer.append(("self_attn.out_proj.bias", "self_attn.o_proj.bias", "same"))
        if cfg.qk_norm:
            layer += [
                ("self_attn.q_norm.weight", "self_attn.q_norm.weight", "same"),
                ("self_attn.k_norm.weight", "self_attn.k_norm.weight", "same"),
            ]
        layer += [
            ("self_attn_norm.weight", "input_layernorm.weight", "same"),
            ("ff_norm.weight", "post_attention_layernorm.weight", "same"),
        ]
        if self.fused:
            layer.append(("ff.linear1.weight", "mlp.gate_up_proj.weight", "same"))
        else:
            layer.append(("ff.linear1.weight", "mlp.gate_proj.weight|mlp.up_proj.weight", "cat"))
        layer.append(("ff.linear2.weight", "mlp.down_proj.weight", "same"))
        if cfg.ffn_bias:
            layer += [
                ("ff.linear1.bias", "mlp.gate_proj.bias|mlp.up_proj.bias", "cat"),
                ("ff.linear2.bias", "mlp.down_proj.bias", "same"),
            ]
        out = [("decoder.embed.embedding.weight", f"{p}embed_tokens.weight", "same")]
        out += _layer_names(f"{p}layers", "decoder.layers", layer, cfg.n_decoder_layers)
        out.append(("decoder.norm.weight", f"{p}norm.weight", "same"))
        if cfg.tie_embeddings == "none":
            out.append(("output.weight", "lm_head.weight", "same"))
        return out

    def split(self, cfg: ModelConfig, mine: str) -> Optional[list[int]]:
        """The sizes of the tensors that `mine` fuses, where they differ (grouped-query attention's q, k, v)."""
        if "qkv_proj" in mine:
            q, kv = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
            return [q, kv, kv]
        return None

    def shapes(self, cfg: ModelConfig, p: str) -> list[Shape]:
        h = ("hidden_size", cfg.d_model)
        q = [("num_attention_heads x head_dim", cfg.n_heads * cfg.head_size), h]
        kv = [("num_key_value_heads x head_dim", cfg.kv_heads * cfg.head_size), h]
        layer = f"{p}layers.0."
        out = [(f"{p}embed_tokens.weight", [("vocab_size", cfg.tgt_vocab_size), h])]
        if self.fused:
            qkv = cfg.n_heads * cfg.head_size + 2 * cfg.kv_heads * cfg.head_size
            keys = "num_attention_heads, num_key_value_heads, head_dim"
            out.append((f"{layer}self_attn.qkv_proj.weight", [(keys, qkv), h]))
            out.append((f"{layer}mlp.gate_up_proj.weight", [("intermediate_size", 2 * cfg.d_ff), h]))
        else:
            out.append((f"{layer}self_attn.q_proj.weight", q))
            out.append((f"{layer}self_attn.k_proj.weight", kv))
            out.append((f"{layer}mlp.gate_proj.weight", [("intermediate_size", cfg.d_ff), h]))
        return out

    def stacks(self, cfg: ModelConfig, p: str) -> list[Stack]:
        return [(f"{p}layers.", "num_hidden_layers", cfg.n_decoder_layers)]


def _rope(k: Keys, head_dim: int) -> dict:
    """The ModelConfig rope fields of a config in either of transformers' forms."""
    where = k.where
    params = k.data.get("rope_parameters")
    if params is not None:  # transformers v5: {"rope_type", "rope_theta", "factor", ...}
        r = Keys(params, f"{where}: rope_parameters")
        theta = r.number("rope_theta", k.number("rope_theta", 10000.0))
        kind = r.text("rope_type", r.text("type", "default"))
        fraction = r.number("partial_rotary_factor", k.number("partial_rotary_factor", 1.0))
        source = "rope_parameters"
    else:
        theta = k.number("rope_theta", 10000.0)
        fraction = k.number("partial_rotary_factor", 1.0)
        scaling = k.data.get("rope_scaling")
        r = Keys(scaling if scaling is not None else {}, f"{where}: rope_scaling")
        kind = r.text("rope_type", r.text("type", "default"))
        source = "rope_scaling"
    if kind not in _ROPE_TYPES:
        _refuse(where, f"{source} type {kind!r}", f"the rope scalings reproduced are {', '.join(_ROPE_TYPES)}")
    fields: dict[str, Any] = dict(positional="rope", rope_theta=theta, rope_fraction=fraction)
    kind = _ROPE_TYPES[kind]
    fields["rope_scaling"] = kind
    if kind != "none":
        fields["rope_factor"] = r.number("factor", 1.0)
    if kind == "dynamic":  # transformers grows the base past max_position_embeddings
        fields["rope_original_max_positions"] = k.integer("max_position_embeddings", 2048)
    if kind == "llama3":
        fields["rope_original_max_positions"] = r.integer("original_max_position_embeddings")
        fields["rope_low_freq_factor"] = r.number("low_freq_factor", 1.0)
        fields["rope_high_freq_factor"] = r.number("high_freq_factor", 4.0)
    if int(head_dim * fraction) % 2:
        raise k.error("partial_rotary_factor", f"is {fraction}, which leaves an odd number of rotating dimensions")
    return fields


def _rope_scaling_out(cfg: ModelConfig) -> Optional[dict]:
    if cfg.rope_scaling == "none":
        return None
    out: dict[str, Any] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
    if cfg.rope_scaling == "llama3":
        out.update(
            original_max_position_embeddings=cfg.rope_original_max_positions,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
        )
    return out


LLAMA = DecoderFamily("llama", "LlamaForCausalLM")
QWEN2 = DecoderFamily("qwen2", "Qwen2ForCausalLM", biases="qwen2")
QWEN3 = DecoderFamily("qwen3", "Qwen3ForCausalLM", head_dim=128, qk_norm=True)
MISTRAL = DecoderFamily("mistral", "MistralForCausalLM", biases="none", window=True)
GEMMA = DecoderFamily("gemma", "GemmaForCausalLM", tied=True, head_dim=256, gemma=True)
PHI3 = DecoderFamily("phi3", "Phi3ForCausalLM", biases="none", window=True, fused=True)
DECODERS = {f.model_type: f for f in (LLAMA, QWEN2, QWEN3, MISTRAL, GEMMA, PHI3)}


def family_for(cfg: ModelConfig, preferred: Optional[str] = None) -> DecoderFamily:
    """The family to export a rotary decoder-only model as: `preferred` (the one it was imported from) where that
    can represent it, else the one whose settings it uses (QK-norm: Qwen3; Gemma's norm: Gemma; q/k/v biases
    alone: Qwen2; partial rotary: Phi-3; a window: Mistral), else Llama."""
    if preferred in DECODERS:
        try:
            DECODERS[preferred].hf_config(cfg, "")
            return DECODERS[preferred]
        except CheckpointError:
            pass
    if cfg.qk_norm:
        return QWEN3
    if cfg.norm == "gemma_rmsnorm":
        return GEMMA
    if cfg.qkv_bias and not cfg.out_bias:
        return QWEN2
    if cfg.rope_fraction < 1.0:
        return PHI3
    if cfg.sliding_window:
        return MISTRAL
    return LLAMA


__all__ = ["DECODERS", "REFUSED", "DecoderFamily", "family_for", "ACTIVATION_IN"]
