"""Typed configs (dataclasses) and strict loading from dicts and YAML files.

`ModelConfig` describes the network. `DataConfig` and `TrainConfig` describe a training run; `RunConfig` holds
all three and is what a YAML recipe in `configs/` contains. Loading is strict: an unknown key is an error with a
close-match suggestion, a value of the wrong type is an error naming the key, and each config checks its own
ranges in `__post_init__`, so a bad value fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .errors import ConfigError
from .task_registry import TRAINABLE

Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]
Positional = Literal["sinusoidal", "sinusoidal_halves", "learned", "rope"]
RopeScaling = Literal["none", "linear", "dynamic", "llama3"]
Norm = Literal["layernorm", "rmsnorm", "gemma_rmsnorm"]
Tying = Literal["none", "decoder", "all"]
Arch = Literal["encoder-decoder", "decoder-only", "encoder-only"]


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "ffn", "all-linear")


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021): each targeted projection W gains a trainable B A (A: r x in,
    B: out x r, B starting at zero), scaled by alpha / r, while W stays frozen. `targets` name projections: q, k,
    v, o (attention), gate, up, down (feed-forward; ffn: all three), or all-linear (every projection but the
    output layer). `train_also`: "head" (the output or classification layer) and/or "norms" train as well."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    train_also: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", self.r, "must be > 0")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check(bool(self.targets), "lora.targets", self.targets, "must name at least one projection")
        for t in self.targets:
            _check(t in LORA_TARGETS, "lora.targets", t, f"must be one of {', '.join(LORA_TARGETS)}")
        for t in self.train_also:
            _check(t in ("head", "norms"), "lora.train_also", t, "must be head or norms")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass
class ModelConfig:
    """The shape of a Transformer. Defaults are the base model of "Attention Is All You Need".

    `arch` picks the encoder-decoder (translation), the decoder-only (language model) or the encoder-only
    (classification, sentence embeddings: BERT's) form; all use the same layers. `final_norm` adds a LayerNorm
    after each stack (None: only with `norm_first`, where it is needed; `torch.nn.Transformer` always has
    one). `tie_embeddings`: "decoder" shares the decoder's input embedding with the output layer, "all" also
    shares it with the encoder's (needs one joint vocabulary). An encoder-only model's vocabulary is
    `src_vocab_size`.

    What pretrained families need besides: `scale_embeddings` (the paper and Marian multiply token embeddings by
    sqrt(d_model); BERT and GPT-2 do not), `embed_norm` (BERT's LayerNorm over embeddings + positions + token
    types), `type_vocab_size` (BERT's segment embeddings), `positional: sinusoidal_halves` (Marian's sinusoids:
    all sines, then all cosines, instead of interleaved), `output_bias` (Marian's final_logits_bias), and the
    ids decoding starts (`bos_id`) and stops (`eos_id`) at. The encoder-only heads: a sentence vector is the
    first token's or the mean of the real tokens' (`pooling`), through BERT's dense + tanh layer for
    classification if `pooler`, into `num_labels` classes; embeddings can be L2-normalised.

    The refinements of today's decoder-only models (Llama, Qwen, Mistral, Gemma), each usable from scratch:
    `positional: rope` (rotary positions, `rope_theta`; `rope_scaling` linear, dynamic or llama3 with
    `rope_factor`, `rope_original_max_positions` and llama3's `rope_low_freq_factor`/`rope_high_freq_factor`;
    `rope_fraction` < 1 rotates only part of each head), `norm: rmsnorm` (or `gemma_rmsnorm`, which scales by
    1 + weight), `qk_norm` (an RMSNorm over each head's queries and keys, Qwen3's), `feed_forward: gated`
    (act(x W_gate) * (x W_up), then W_down: SwiGLU with `activation: silu`, GeGLU with gelu/gelu_tanh),
    `n_kv_heads` < n_heads (grouped-query attention; 1 is multi-query), `head_dim` (when it is not d_model /
    n_heads), biases per projection (`qkv_bias`, `out_bias`, `ffn_bias`), `sliding_window` (each token attends
    to itself and the sliding_window - 1 before it, Mistral's) and `extra_eos_ids` (more ids that end a
    generation, e.g. an end-of-turn token).
    """

    src_vocab_size: int = 0
    tgt_vocab_size: int = 0
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: Optional[float] = None  # inside the feed-forward, after the activation (None: dropout)
    activation: Activation = "relu"
    norm_first: bool = False
    final_norm: Optional[bool] = None
    positional: Positional = "sinusoidal"
    max_positions: int = 1024
    tie_embeddings: Tying = "none"
    pad_id: int = 0
    layer_norm_eps: float = 1e-5
    arch: Arch = "encoder-decoder"
    scale_embeddings: bool = True
    embed_norm: bool = False
    type_vocab_size: int = 0
    output_bias: bool = False
    bos_id: int = 1
    eos_id: int = 2
    num_labels: int = 0
    pooling: Literal["cls", "mean"] = "mean"
    pooler: bool = False
    normalize_embeddings: bool = False
    init_from: Optional[str] = None  # a checkpoint to start from (its architecture, weights and tokenizer)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0
    rope_original_max_positions: int = 0  # the context the scaled frequencies stretch (dynamic, llama3)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_fraction: float = 1.0  # the share of each head's dimensions that rotate
    norm: Norm = "layernorm"
    qk_norm: bool = False
    feed_forward: Literal["plain", "gated"] = "plain"
    n_kv_heads: Optional[int] = None  # None: n_heads (multi-head attention)
    head_dim: Optional[int] = None  # None: d_model // n_heads
    qkv_bias: bool = True
    out_bias: bool = True
    ffn_bias: bool = True
    sliding_window: int = 0  # 0: attend to every earlier token
    extra_eos_ids: list[int] = field(default_factory=list)
    lora: Optional[LoRAConfig] = None  # low-rank adapters on the projections (set by train.lora)

    def __post_init__(self) -> None:
        _check_literals(self)
        enc_dec = self.arch == "encoder-decoder"
        if self.final_norm is None:
            self.final_norm = self.norm_first
        for name in ("d_model", "n_heads", "d_ff", "max_positions"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        for name in ("src_vocab_size", "tgt_vocab_size", "type_vocab_size", "num_labels"):  # vocabularies: 0 = set
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")  # by training
        if self.arch != "decoder-only":
            _check(self.n_encoder_layers > 0, "n_encoder_layers", self.n_encoder_layers, "must be > 0")
        if self.arch != "encoder-only":
            _check(self.n_decoder_layers > 0, "n_decoder_layers", self.n_decoder_layers, "must be > 0")
        if self.head_dim is None:
            _check(
                self.d_model % self.n_heads == 0,
                "d_model",
                self.d_model,
                f"must be divisible by n_heads={self.n_heads} (or set head_dim)",
            )
        else:
            _check(self.head_dim > 0, "head_dim", self.head_dim, "must be > 0")
        self._check_attention_and_positions()
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            v = getattr(self, name)
            _check(v is None or 0.0 <= v < 1.0, name, v, "must be in [0, 1)")
        _check(self.layer_norm_eps > 0, "layer_norm_eps", self.layer_norm_eps, "must be > 0")
        vocab = max(self.tgt_vocab_size, self.src_vocab_size)
        if vocab:
            for name in ("pad_id", "bos_id", "eos_id"):
                _check(
                    0 <= getattr(self, name) < vocab, name, getattr(self, name), f"must be a token id in [0, {vocab})"
                )
        if self.tie_embeddings == "all" and enc_dec:
            _check(
                self.src_vocab_size == self.tgt_vocab_size,
                "tie_embeddings",
                self.tie_embeddings,
                f"'all' needs one joint vocabulary, but src_vocab_size={self.src_vocab_size} "
                f"!= tgt_vocab_size={self.tgt_vocab_size}",
            )

    def _check_attention_and_positions(self) -> None:
        kv = self.kv_heads
        _check(kv > 0, "n_kv_heads", kv, "must be > 0")
        _check(self.n_heads % kv == 0, "n_kv_heads", kv, f"must divide n_heads={self.n_heads}")
        _check(self.sliding_window >= 0, "sliding_window", self.sliding_window, "must be >= 0 (0: no window)")
        _check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        _check(0.0 < self.rope_fraction <= 1.0, "rope_fraction", self.rope_fraction, "must be in (0, 1]")
        if self.positional == "rope":
            _check(
                self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
                "rope_fraction",
                self.rope_fraction,
                f"must leave an even number (>= 2) of rotating dimensions per head, got {self.rotary_dim}",
            )
        if self.rope_scaling != "none":
            _check(self.rope_factor > 0, "rope_factor", self.rope_factor, "must be > 0")
        if self.rope_scaling in ("dynamic", "llama3"):
            _check(
                self.rope_original_max_positions > 0,
                "rope_original_max_positions",
                self.rope_original_max_positions,
                f"must be > 0 for rope_scaling={self.rope_scaling!r}",
            )
        if self.rope_scaling == "llama3":
            _check(
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
                "rope_high_freq_factor",
                self.rope_high_freq_factor,
                f"must exceed rope_low_freq_factor={self.rope_low_freq_factor} (both > 0)",
            )
        for i, eos in enumerate(self.extra_eos_ids):
            _check(eos >= 0, f"extra_eos_ids[{i}]", eos, "must be a token id (>= 0)")

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when unset."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        """The width of one attention head: head_dim, or d_model / n_heads when unset."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def rotary_dim(self) -> int:
        """How many of a head's dimensions rotate under RoPE."""
        return int(self.head_size * self.rope_fraction)

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends a generation: eos_id, then extra_eos_ids."""
        return [self.eos_id, *(i for i in self.extra_eos_ids if i != self.eos_id)]

    @property
    def feed_forward_dropout(self) -> float:
        """Dropout inside the feed-forward: `activation_dropout`, or `dropout` when that is unset."""
        return self.dropout if self.activation_dropout is None else self.activation_dropout

    @property
    def max_source_len(self) -> Optional[int]:
        """The longest source the model can read, in tokens: a learned positional table's size (longer inputs
        are truncated, with a warning), else None (sinusoidal encodings take any length)."""
        return self.max_positions if self.positional == "learned" else None

    def check_vocab(self) -> None:
        """Raise unless the vocabulary sizes are set (a model cannot be built before they are)."""
        names = {
            "encoder-decoder": ("src_vocab_size", "tgt_vocab_size"),
            "decoder-only": ("tgt_vocab_size",),
            "encoder-only": ("src_vocab_size",),
        }[self.arch]
        for name in names:
            _check(getattr(self, name) > 0, name, getattr(self, name), "must be > 0 to build a model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What a fine-tuning recipe sets for a model that `init_from` provides: the head and the regularisation.
# Everything else (sizes, vocabulary, norms, positions) is the starting checkpoint's.
HEAD_FIELDS = (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "num_labels",
    "pooling",
    "pooler",
    "normalize_embeddings",
    "init_from",
)


def fine_tuned(base: ModelConfig, recipe: ModelConfig, **changes: Any) -> ModelConfig:
    """The model a recipe fine-tunes: `base`'s architecture and vocabulary with the recipe's `HEAD_FIELDS`
    (and `changes`, e.g. the number of labels the data has)."""
    return dataclasses.replace(base, **{**{f: getattr(recipe, f) for f in HEAD_FIELDS}, **changes})


@dataclass
class DataConfig:
    """Where the training text is and how to tokenise it.

    task "translation": `train_src`/`train_tgt` line-aligned files (or `train_tsv`, tab-separated pairs), the
    same for validation. task "lm": one plain `text` file, split into train/validation by `val_fraction`.
    task "synthetic": the built-in sequence task (see `transformer.data.SyntheticTask`). task
    "classification": `train_tsv` and `val_tsv` hold `label<TAB>text` lines (a header line is recognised);
    texts longer than `max_len` tokens are truncated.
    """

    task: str = "translation"  # one of task_registry.TRAINABLE
    train_src: Optional[str] = None
    train_tgt: Optional[str] = None
    train_tsv: Optional[str] = None
    val_src: Optional[str] = None
    val_tgt: Optional[str] = None
    val_tsv: Optional[str] = None
    text: Optional[str] = None
    # task causal-lm: {"prompt", "response"} or {"messages": [...]} per line; neither file set: the built-in task's
    # strings as instructions ("reverse: abc\n" -> "cba")
    train_jsonl: Optional[str] = None
    val_jsonl: Optional[str] = None
    val_fraction: float = 0.1
    tokenizer: Literal["bpe", "bytebpe", "char", "sentencepiece"] = "bpe"
    tokenizer_from: Optional[str] = None  # reuse a tokenizer: a checkpoint directory or a tokenizer file
    tokenizer_sample_lines: int = 1_000_000  # lines of each training file the tokenizer is trained on
    cache_dir: Optional[str] = None  # where prepared corpora go (default: files.cache_root() / prepared)
    vocab_size: int = 8000
    joint_vocab: bool = True
    max_len: int = 128
    block_size: int = 64
    synthetic_task: str = "reverse"
    synthetic_min_len: int = 1
    synthetic_max_len: int = 16
    synthetic_train_size: int = 20000
    synthetic_val_size: int = 500

    def __post_init__(self) -> None:
        _check_literals(self)
        _check(self.task in TRAINABLE, "task", self.task, f"must be one of {', '.join(map(repr, TRAINABLE))}")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        for name in (
            "vocab_size",
            "max_len",
            "block_size",
            "synthetic_train_size",
            "synthetic_val_size",
            "synthetic_min_len",
            "synthetic_max_len",
            "tokenizer_sample_lines",
        ):
            _check(getattr(self, name) > 0, f"data.{name}", getattr(self, name), "must be > 0")


@dataclass
class TrainConfig:
    """The optimisation recipe. `lr` is the peak learning rate reached after `warmup_steps`; `schedule`
    "inverse_sqrt" decays as 1/sqrt(step) afterwards (the paper), "cosine" and "linear" decay to `min_lr` at
    the last step (`max_steps`, or what `max_epochs` comes to). `head_lr`: the learning rate of layers that
    `model.init_from` did not provide (a new classification head), if other than `lr`."""

    seed: int = 0
    max_tokens: int = 4096
    batch_size: int = 0  # sentences (or LM blocks) per batch; 0 means batch by max_tokens only
    accumulate: int = 1
    lr: float = 7e-4
    min_lr: float = 0.0
    warmup_steps: int = 4000
    schedule: Literal["inverse_sqrt", "cosine", "linear", "constant"] = "inverse_sqrt"
    head_lr: Optional[float] = None
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    max_steps: int = 0
    max_epochs: int = 0
    max_minutes: float = 0.0
    stop_at: Optional[float] = None  # stop once the validation metric reaches this (>= a score, <= val_loss)
    eval_every: int = 500
    eval_bleu_sentences: int = 500
    eval_beam: int = 1
    keep_checkpoints: int = 5
    average_last: int = 0  # at the end, average the last k step checkpoints into RUN_DIR/averaged (0: off)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16 = bf16 autocast; auto: bf16 where it is native
    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda, cuda:N
    threads: int = 0
    log_every: int = 50
    max_bad_steps: int = 5  # consecutive steps with a non-finite loss/gradient before training stops
    fsdp: bool = False  # shard parameters with FSDP2 (under torchrun) instead of replicating them (DDP)
    lora: Optional[LoRAConfig] = None  # train low-rank adapters only, the model's own weights frozen

    def __post_init__(self) -> None:
        _check_literals(self)
        for name in (
            "max_tokens",
            "accumulate",
            "eval_every",
            "log_every",
            "eval_beam",
            "keep_checkpoints",
            "max_bad_steps",
        ):
            _check(getattr(self, name) > 0, f"train.{name}", getattr(self, name), "must be > 0")
        for name in (
            "batch_size",
            "warmup_steps",
            "max_steps",
            "max_epochs",
            "threads",
            "eval_bleu_sentences",
            "average_last",
        ):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "must be >= 0")
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(0 <= self.min_lr <= self.lr, "train.min_lr", self.min_lr, "must be in [0, lr]")
        _check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        _check(self.clip_norm >= 0, "train.clip_norm", self.clip_norm, "must be >= 0 (0 disables clipping)")
        _check(self.max_minutes >= 0, "train.max_minutes", self.max_minutes, "must be >= 0")
        _check(all(0.0 <= b < 1.0 for b in self.betas), "train.betas", self.betas, "must be two numbers in [0, 1)")
        _check(
            self.device.split(":")[0] in ("auto", "cpu", "cuda"),
            "train.device",
            self.device,
            "must be auto, cpu, cuda or cuda:N",
        )
        if self.schedule in ("cosine", "linear"):
            _check(
                self.max_steps > 0 or self.max_epochs > 0,
                "train.schedule",
                self.schedule,
                f"{self.schedule!r} decays to the last step: it needs train.max_steps or train.max_epochs",
            )
        _check(self.head_lr is None or self.head_lr > 0, "train.head_lr", self.head_lr, "must be > 0")
        _check(
            self.average_last <= self.keep_checkpoints,
            "train.average_last",
            self.average_last,
            f"cannot exceed train.keep_checkpoints={self.keep_checkpoints}",
        )


@dataclass
class RunConfig:
    """A whole recipe: what a YAML file in `configs/` holds.

    `fp32_variant` (optional) holds `model`/`data`/`train` values that replace the recipe's own on a machine
    where `train.precision: auto` resolves to fp32 (a CPU without native bf16 gets a fraction of the tokens in
    the same time budget, and wants e.g. a shorter warmup); `for_precision` applies it.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp32_variant: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.fp32_variant:
            self.for_precision("fp32")  # check the variant's keys and values now, not on some other machine

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_precision(self, precision: str) -> "RunConfig":
        """This recipe as it runs at `precision` ("fp32" or "bf16"): the fp32 variant applied where it applies,
        the precision fixed (so that a resumed run keeps it), and no variant left."""
        data = self.to_dict()
        variant = data.pop("fp32_variant") or {}
        if precision == "fp32":
            for section, values in variant.items():
                if section not in ("model", "data", "train") or not isinstance(values, dict):
                    raise ConfigError(f"fp32_variant.{section}: expected one of the sections model, data, train")
                data[section].update(values)
        data["train"]["precision"] = precision
        try:
            return from_dict(RunConfig, data)
        except ConfigError as e:
            raise ConfigError(f"fp32_variant: {e}") from None

    def variant_changes(self, precision: str) -> list[str]:
        """The `section.key=value` settings that `for_precision(precision)` changes (for the log)."""
        if precision != "fp32" or not self.fp32_variant:
            return []
        return [f"{s}.{k}={v}" for s, values in self.fp32_variant.items() for k, v in values.items()]


# ----------------------------------------------------------------------------------------------------------
# Strict loading


def _check_literals(obj: Any) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        allowed = _literal_values(hints[f.name])
        value = getattr(obj, f.name)
        if allowed is not None and value not in allowed and value is not None:
            raise ConfigError(f"{f.name}={value!r}: must be one of {', '.join(map(repr, allowed))}")


def _literal_values(tp: Any) -> Optional[tuple]:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            vals = _literal_values(arg)
            if vals is not None:
                return vals
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted where lossless (int -> float, list ->
    tuple). Raises ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(repr, typing.get_args(tp)))
            raise ConfigError(f"{key}={value!r}: must be one of {choices}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r}: expected a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{key}.")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in a config class


T = typing.TypeVar("T")


def _bf16_to_precision(value: Any) -> str:
    if not isinstance(value, bool):
        raise ConfigError(
            f"train.bf16={value!r}: expected true or false (or the newer train.precision: auto, fp32 or bf16)"
        )
    return "bf16" if value else "fp32"


# Keys of older recipes and run directories, read as their replacement: (class, old key) -> (new key, mapping)
_RENAMED: dict[tuple[str, str], tuple[str, Any]] = {
    ("TrainConfig", "bf16"): ("precision", _bf16_to_precision),
}


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build the dataclass `cls` from a plain dict, strictly: unknown keys and wrong types are ConfigErrors
    naming the key (with a close-match suggestion for a misspelt key)."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if (cls.__name__, key) in _RENAMED and _RENAMED[cls.__name__, key][0] not in data:
            key, value = _RENAMED[cls.__name__, key][0], _RENAMED[cls.__name__, key][1](value)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        if prefix and not msg.startswith(prefix):
            msg = prefix + msg
        raise ConfigError(msg) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one `--set key.sub=value` override; the value is read as YAML (so 3, 0.1, true, [1, 2] work)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.lr=5e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_run_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Read a YAML recipe strictly and apply `key=value` overrides. Every problem is a ConfigError that names
    the file and the key."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections model, data, train")
    try:
        return from_dict(RunConfig, apply_overrides(data, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def apply_overrides(data: dict, overrides: tuple[str, ...] | list[str]) -> dict:
    """Apply `--set section.key=value` overrides to a recipe's dict (in place; returned for convenience)."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{k}' is not a section")
        node[keys[-1]] = value
    return data
