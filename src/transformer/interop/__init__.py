"""Pretrained checkpoints in and out: Hugging Face BERT, Marian, GPT-2, Llama, Qwen2, Qwen3, Mistral, Gemma and
Phi-3 directories on local disk <-> this package's models and checkpoints. The model code knows nothing of
Hugging Face; the name tables are in `families.py` and `decoders.py`, the tokenizer bridges in `tokenizers.py`.

    ckpt = from_pretrained("path/to/hf_dir")          # a Checkpoint: model, config, tokenizers
    save_checkpoint(out, ckpt.model, ckpt.task, ckpt.tokenizers)   # or: transformer import HF_DIR --out CKPT
    export_hf(ckpt, "path/to/new_hf_dir")             # or: transformer export CKPT --to hf DIR

Only safetensors weights are read: a directory with only `pytorch_model.bin` (a pickle, which can run code
when loaded) is refused with what to do instead. The directory is foreign input: its config is read by type
(`metadata.Keys`), path names in its metadata must stay inside it, and the config's sizes are checked against
the weights file's header before a model is built, so each mistake in it is one CheckpointError naming the file.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import Checkpoint, load_weights
from ..errors import CheckpointError
from ..files import atomic_path, foreign_entries, new_directory, read_json, write_json_atomic
from ..model import build_model
from ..tokenizers import PretrainedTokenizer, SentencePieceTokenizer
from .decoders import DECODERS, REFUSED, family_for
from .families import FAMILIES as _CLASSIC
from .families import Bert
from .metadata import Keys, inside, show

log = logging.getLogger("transformer")

FAMILIES = {**_CLASSIC, **DECODERS}

# Where a family may store one tensor under another name (tied weights are saved once, under any of them).
_ALIASES = {
    "model.encoder.embed_tokens.weight": ["model.shared.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"],
    "model.decoder.embed_tokens.weight": ["lm_head.weight", "model.shared.weight"],
    "final_logits_bias": [],
}


def from_pretrained(hf_dir: str | Path, device: str | torch.device = "cpu", dtype: str = "auto") -> Checkpoint:
    """A Hugging Face model directory (config.json, model.safetensors, tokenizer files) as a Checkpoint of this
    package, its weights copied exactly. Raises CheckpointError naming the file and the setting it refuses (a
    DataError for a tokenizer.json that `tokenizers` cannot read).

    dtype: "auto" keeps bf16 weights as bf16 where the device computes in bf16 natively (else fp32, logged);
    "fp32" or "bf16" force one. A decoder-only model's end ids come from generation_config.json and its chat
    template from tokenizer_config.json (or chat_template.jinja), kept in `meta["chat"]`."""
    hf_dir = Path(hf_dir)
    hf = read_json(hf_dir / "config.json", CheckpointError, f"missing; {hf_dir} is not a Hugging Face model directory")
    keys = Keys(hf, str(hf_dir / "config.json"))
    model_type = keys.text("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        why = f" ({REFUSED[model_type]}): refused rather than approximated" if model_type in REFUSED else ""
        raise CheckpointError(
            f"{keys.where}: model_type={model_type!r} is not supported{why} (supported: {', '.join(FAMILIES)})"
        )
    extra = _sentence_transformers(hf_dir) if family.model_type == "bert" else {}
    files = _weight_files(hf_dir)
    shapes = _read_shapes(files)
    if family.model_type == "bert":
        extra.setdefault("pooler", any(k.endswith("pooler.dense.weight") for k in shapes))
    cfg = family.config(keys, **extra)
    _check_shapes(family, cfg, shapes, hf_dir, keys.where)  # before anything is built or loaded
    modern = family.model_type in DECODERS
    meta: dict[str, Any] = {"imported_from": str(hf_dir), "hf_model_type": family.model_type}
    if modern:
        cfg = _with_generation_config(cfg, hf_dir)
        meta["chat"] = _chat_metadata(hf_dir)
    tokenizers = _tokenizers(family.model_type, hf_dir)
    tensors = _read_weights(files)
    model = build_model(cfg)
    state = _map_in(family, cfg, tensors, hf_dir)
    load_weights(model, state, hf_dir / "model.safetensors")
    model.to(device=device, dtype=_dtype(dtype, tensors, device, hf_dir)).eval()
    task = {"bert": "classification" if cfg.num_labels else "embedding", "gpt2": "lm", "marian": "translation"}
    if cfg.num_labels:
        meta["labels"] = Bert.labels(keys)
    return Checkpoint(model, cfg, "lm" if modern else task[family.model_type], tokenizers, meta, hf_dir)


def _dtype(wanted: str, tensors: dict[str, torch.Tensor], device: str | torch.device, hf_dir: Path) -> torch.dtype:
    """The dtype to hold imported weights in (see `from_pretrained`)."""
    from ..backend import bf16_is_native

    if wanted not in ("auto", "fp32", "bf16"):
        raise CheckpointError(f"dtype={wanted!r}: expected auto, fp32 or bf16")
    stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if wanted == "auto":
        if stored != {torch.bfloat16}:
            return torch.float32
        native = bf16_is_native(torch.device(device))
        log.info(
            "%s: bf16 weights, loaded as %s", hf_dir, "bf16 (native here)" if native else "fp32 (no native bf16 here)"
        )
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if wanted == "bf16" else torch.float32


def _with_generation_config(cfg, hf_dir: Path):
    """`cfg` with the end ids of generation_config.json (a list, for chat models' end-of-turn tokens) added."""
    import dataclasses

    path = hf_dir / "generation_config.json"
    if not path.is_file():
        return cfg
    keys = Keys(read_json(path, CheckpointError, "unreadable"), str(path))
    ends = keys.token_ids("eos_token_id", [])
    vocab = cfg.tgt_vocab_size
    for i in ends:
        if i >= vocab:
            raise keys.error("eos_token_id", f"holds {i}, outside the vocabulary of {vocab} tokens")
    extra = [i for i in [*cfg.extra_eos_ids, *ends] if i != cfg.eos_id]
    return dataclasses.replace(cfg, extra_eos_ids=list(dict.fromkeys(extra)))


def _chat_metadata(hf_dir: Path) -> dict:
    """The chat template and the special tokens' texts it may refer to (bos_token, eos_token, ...), from
    tokenizer_config.json, with chat_template.jinja taking precedence as in transformers v5. {} without one."""
    path = hf_dir / "tokenizer_config.json"
    data = read_json(path, CheckpointError, "unreadable") if path.is_file() else {}
    keys = Keys(data, str(path))
    template = keys.data.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise keys.error("chat_template", f"must be a string or a list of named templates, got {show(template)}")
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if template is None:
        return {}
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        value = keys.data.get(name)
        if isinstance(value, dict):  # a serialised AddedToken
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    return {"template": template, "special_tokens": special}


def _weight_files(hf_dir: Path) -> list[Path]:
    files = sorted(hf_dir.glob("model*.safetensors"))
    if not files:
        if (hf_dir / "pytorch_model.bin").exists():
            raise CheckpointError(
                f"{hf_dir / 'pytorch_model.bin'}: weights stored only as a pickle, which can run arbitrary code when "
                "loaded, so this package never reads one. On a machine you trust, convert it: "
                "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(f"{hf_dir}: no model.safetensors")
    return files


def _read_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Each tensor's shape and file, from the files' headers alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for name in st.keys():
                    shapes[name] = (tuple(st.get_slice(name).get_shape()), f)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated weights file ({e})") from None
    return shapes


def _check_shapes(family, cfg, shapes: dict, hf_dir: Path, where: str) -> None:
    """Refuse a config whose sizes disagree with the weights file's (a config.json claiming hidden_size 10**6
    would otherwise build a model too large for memory before load_weights compares a single shape)."""
    prefix = _prefix(family.model_type, shapes)
    for name, dims in family.shapes(cfg, prefix):
        held, f = _lookup(shapes, name, hf_dir)
        want = tuple(n for _, n in dims)
        if held != want:
            # name the keys of the sizes that differ (all of them if the number of dimensions does)
            differ = [i for i in range(len(want)) if len(held) != len(want) or held[i] != want[i]]
            blame = ", ".join(f"{dims[i][0]}={want[i]}" for i in differ if dims[i][0]) or "fixed sizes"
            raise CheckpointError(f"{f}: tensor '{name}' has shape {held}, but {where} ({blame}) implies {want}")
    for stack, key, n in family.stacks(cfg, prefix):
        layer = re.compile(re.escape(stack) + r"(\d+)\.")
        count = 1 + max((int(m.group(1)) for s in shapes if (m := layer.match(s))), default=-1)
        if count != n:
            raise CheckpointError(
                f"{where}: key '{key}' is {n}, but {hf_dir / 'model.safetensors'} holds "
                f"{count} such layers (tensors '{stack}N.*')"
            )


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:  # one file, or the shards of a large model
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated weights file ({e})") from None
    return tensors


def _map_in(family, cfg, tensors: dict[str, torch.Tensor], hf_dir: Path) -> dict[str, torch.Tensor]:
    """Their tensors -> ours, by the family's name table (transposing and concatenating where it says)."""
    prefix = _prefix(family.model_type, tensors)
    state = {}
    for mine, theirs, how in family.names(cfg, prefix):
        parts = [_lookup(tensors, name, hf_dir) for name in theirs.split("|")]
        try:  # a file whose tensors disagree with each other (query and key of two widths) cannot be joined
            if how == "t":
                parts = [p.t() for p in parts]
            elif how == "row":
                parts = [p.reshape(-1) for p in parts]
            state[mine] = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        except RuntimeError:
            shapes = ", ".join(f"'{n}' {tuple(p.shape)}" for n, p in zip(theirs.split("|"), parts))
            raise CheckpointError(f"{hf_dir / 'model.safetensors'}: tensors of inconsistent shapes: {shapes}") from None
    return state


def _lookup(tensors: dict[str, torch.Tensor], name: str, hf_dir: Path) -> torch.Tensor:
    for candidate in [name, *_ALIASES.get(name, [])]:
        if candidate in tensors:
            return tensors[candidate]
    raise CheckpointError(f"{hf_dir / 'model.safetensors'}: missing tensor '{name}'")


def _prefix(model_type: str, tensors: dict) -> str:
    """The prefix a head model puts before the base model's names (BertFor...: "bert.", GPT2LMHeadModel:
    "transformer.", MarianMTModel: "model.")."""
    prefix = {"bert": "bert.", "gpt2": "transformer.", "marian": "model."}.get(model_type, "model.")
    return prefix if any(k.startswith(prefix) for k in tensors) else ""


def _sentence_transformers(hf_dir: Path) -> dict:
    """How a sentence-transformers model makes a sentence vector (1_Pooling/config.json, modules.json)."""
    modules_file = hf_dir / "modules.json"
    if not modules_file.is_file():
        return {}
    modules = read_json(modules_file, CheckpointError, "missing")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(
            f'{modules_file}: must be a JSON list of modules ([{{"type": ..., "path": ...}}, ...]), got {show(modules)}'
        )
    kinds, dirs = [], []
    for i, m in enumerate(modules):
        entry = Keys(m, f"{modules_file}: module {i}")
        kinds.append(entry.text("type", ""))
        # every module's path is checked, used or not: a directory naming a path outside itself is refused
        dirs.append(inside(hf_dir, entry.text("path", ""), modules_file, f'module {i}\'s "path"'))
    unknown = [k for k in kinds if not k.endswith(("Transformer", "Pooling", "Normalize"))]
    if unknown:
        raise CheckpointError(
            f"{modules_file}: module {unknown[0]!r} is not supported (Transformer, Pooling, Normalize)"
        )
    pooling = "mean"
    for kind, module_dir in zip(kinds, dirs):
        if kind.endswith("Pooling"):
            pooling = _pooling(module_dir / "config.json")
    return {"pooling": pooling, "normalize": any(k.endswith("Normalize") for k in kinds), "pooler": False}


def _pooling(path: Path) -> str:
    pool_cfg = Keys(read_json(path, CheckpointError, "missing: a Pooling module's config"), str(path))
    modes = [k for k in pool_cfg.data if k.startswith("pooling_mode") and pool_cfg.flag(k, False)]
    if modes not in (["pooling_mode_mean_tokens"], ["pooling_mode_cls_token"]):
        raise CheckpointError(f"{path}: pooling {modes} is not supported (mean or first-token pooling)")
    return "mean" if modes == ["pooling_mode_mean_tokens"] else "cls"


def _tokenizers(model_type: str, hf_dir: Path) -> dict:
    # The file names are fixed here, never read from the directory's metadata (tokenizer_config.json is not
    # consulted), so none can point outside it.
    if model_type == "marian":
        return _marian_tokenizers(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{hf_dir / 'tokenizer.json'}: missing (only tokenizer.json tokenizers are read)")
    # BERT's [CLS] ... [SEP] and Llama's <s> are added as transformers adds them by default; GPT-2 adds none
    tok = PretrainedTokenizer.from_file(hf_dir / "tokenizer.json", add_special_tokens=model_type != "gpt2")
    return {"src": tok} if model_type == "bert" else {"tgt": tok}


def _marian_tokenizers(hf_dir: Path) -> dict:
    vocab_file = hf_dir / "vocab.json"
    vocab = read_json(vocab_file, CheckpointError, "missing: a Marian model's vocabulary")
    if not isinstance(vocab, dict):
        raise CheckpointError(f"{vocab_file}: must be a JSON object of piece -> id, got {show(vocab)}")
    for piece, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise CheckpointError(f"{vocab_file}: entry {piece!r} must be a token id (an integer >= 0), got {show(i)}")
    for needed in ("</s>", "<unk>"):
        if needed not in vocab:
            raise CheckpointError(f"{vocab_file}: entry {needed!r} is missing (Marian's end and unknown tokens)")
    spm = {}
    for role, name in (("src", "source.spm"), ("tgt", "target.spm")):
        path = hf_dir / name
        try:
            model = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing: a Marian model's SentencePiece model") from None
        except OSError as e:
            raise CheckpointError(f"{path}: unreadable ({e})") from None
        try:
            spm[role] = SentencePieceTokenizer(model, vocab, append_eos=role == "src")
        except RuntimeError as e:  # sentencepiece's parse error
            raise CheckpointError(f"{path}: not a SentencePiece model ({e})") from None
    return spm


# ----------------------------------------------------------------------------------------------------------
# Export


# What an export writes into a Hugging Face model directory (and so what `overwrite` may replace)
HF_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "source.spm",
    "target.spm",
    "vocab.json",
    "modules.json",
    "1_Pooling",
    "2_Normalize",
    "generation_config.json",
    "special_tokens_map.json",
}


def _not_an_hf_export(directory: Path) -> Optional[str]:
    """For `files.check_output_dir`: None when `directory` holds a Hugging Face model and nothing else."""
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        return "no config.json and model.safetensors of a Hugging Face model"
    return foreign_entries(directory, lambda name: name in HF_FILES)


def export_hf(ckpt: Checkpoint, out: str | Path, overwrite: bool = False) -> Path:
    """Write `ckpt` as a Hugging Face model directory (config.json, model.safetensors, tokenizer files) that
    `transformers`' from_pretrained loads, if one of the supported classes can represent it exactly. `out` is
    written whole or not at all; it must be new or empty, or hold an export (replaced with `overwrite`)."""
    from safetensors.torch import save_file

    out = Path(out)
    cfg = ckpt.config
    if ckpt.model.config.lora is not None:
        raise CheckpointError(
            f"{ckpt.path or 'checkpoint'}: holds unmerged LoRA adapters; fold them in first (transformer merge) or "
            "export the adapters alone (--to peft)"
        )
    family = {"encoder-only": FAMILIES["bert"], "decoder-only": FAMILIES["gpt2"]}.get(cfg.arch, FAMILIES["marian"])
    if cfg.arch == "decoder-only" and (cfg.positional == "rope" or cfg.norm != "layernorm"):
        family = family_for(cfg, ckpt.meta.get("hf_model_type"))  # Llama and the families built like it
    where = str(ckpt.path or "checkpoint")
    if cfg.arch == "encoder-decoder" and cfg.norm_first:
        raise CheckpointError(
            f"{where}: no Hugging Face class represents a pre-norm encoder-decoder exactly "
            "(Marian is post-norm); export it for serving with CTranslate2 instead "
            "(transformer export CKPT --to ct2 DIR)"
        )
    hf = family.hf_config(cfg, where)
    ours = ckpt.model.state_dict()
    tensors = {}
    prefix = {"bert": "bert." if cfg.num_labels else "", "gpt2": "transformer."}.get(family.model_type, "model.")
    for mine, theirs, how in family.names(cfg, prefix):
        names = theirs.split("|")
        value = ours[mine]
        sizes = family.split(cfg, mine) if how == "cat" and hasattr(family, "split") else None
        parts = (value.split(sizes) if sizes else value.chunk(len(names))) if how == "cat" else [value]
        for name, part in zip(names, parts):
            part = part.t() if how == "t" else part.reshape(1, -1) if how == "row" else part
            tensors[name] = part.detach().contiguous().cpu()
    if family.model_type == "marian":
        _add_marian_aliases(tensors, cfg)
    with new_directory(out, "Hugging Face model", _not_an_hf_export, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _export_tokenizers(ckpt, hf, tmp)
        if family.model_type == "bert" and not cfg.num_labels:
            _export_pooling(cfg, tmp)
        write_json_atomic(tmp / "config.json", hf)
    return out


def _export_pooling(cfg, out: Path) -> None:
    """An embedding model's pooling, as sentence-transformers describes it (modules.json, 1_Pooling/)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if cfg.normalize_embeddings:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    pooling = {
        "word_embedding_dimension": cfg.d_model,
        "pooling_mode_cls_token": cfg.pooling == "cls",
        "pooling_mode_mean_tokens": cfg.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    write_json_atomic(out / "modules.json", modules)
    write_json_atomic(out / "1_Pooling" / "config.json", pooling)


def _add_marian_aliases(tensors: dict, cfg) -> None:
    """transformers' Marian expects `model.shared.weight` when the embeddings are shared, and reads the
    decoder's from the encoder's then; the tied output layer is not stored."""
    if cfg.tie_embeddings == "all":  # copies: safetensors stores no two names for one tensor
        tensors["model.shared.weight"] = tensors["model.encoder.embed_tokens.weight"].clone()
        tensors["model.decoder.embed_tokens.weight"] = tensors["model.encoder.embed_tokens.weight"].clone()


def _export_tokenizers(ckpt: Checkpoint, hf: dict, out: Path) -> None:
    toks = ckpt.tokenizers
    if hf["model_type"] == "marian":
        src, tgt = toks["src"], toks["tgt"]
        if not isinstance(src, SentencePieceTokenizer) or not isinstance(tgt, SentencePieceTokenizer):
            raise CheckpointError(
                f"{ckpt.path}: a Marian export needs SentencePiece tokenizers (this model's are "
                f"{type(src).__name__}); the weights alone are not a usable translator"
            )
        for name, tok in (("source.spm", src), ("target.spm", tgt)):
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(tok.model)
        write_json_atomic(out / "vocab.json", src.vocab)
        write_json_atomic(out / "tokenizer_config.json", {"tokenizer_class": "MarianTokenizer"})
        return
    tok = toks.get("src") or toks.get("tgt")
    inner = getattr(tok, "tok", None)  # a tokenizers.Tokenizer (ours or an imported one)
    if inner is None:
        raise CheckpointError(f"{ckpt.path}: its tokenizer ({type(tok).__name__}) has no tokenizer.json form")
    with atomic_path(out / "tokenizer.json") as tmp:
        tmp.write_text(inner.to_str(), encoding="utf-8")
    tokenizer_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if hf["model_type"] in DECODERS:
        chat = ckpt.meta.get("chat") or {}
        tokenizer_config.update(chat.get("special_tokens", {}))
        if chat.get("template"):
            tokenizer_config["chat_template"] = chat["template"]
        cfg = ckpt.config
        generation = {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_ids if len(cfg.eos_ids) > 1 else cfg.eos_id}
        write_json_atomic(out / "generation_config.json", generation)
    write_json_atomic(out / "tokenizer_config.json", tokenizer_config)


__all__ = ["from_pretrained", "export_hf"]
