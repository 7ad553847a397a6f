"""LoRA adapters in peft's layout: `adapter_config.json` + `adapter_model.safetensors`, named for the Hugging Face
model that `export_hf` writes, so `peft.PeftModel.from_pretrained(export, adapter_dir)` reads ours and ours reads
an adapter trained with peft.

peft keeps one (A, B) pair per Hugging Face module (q_proj, k_proj, ..., gate_proj), stored as
`base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r); this package's fused
projections keep one pair per part of their rows (lora.py), so each part maps to one module of the family's
name table. What has no such form is refused by name: GPT-2's transposed Conv1D weights, Phi-3's fused modules,
an adapter that also trains the head or the norms, and peft's variants (DoRA, rsLoRA, per-module ranks).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..config import LoRAConfig, ModelConfig
from ..errors import CheckpointError
from ..files import atomic_path, foreign_entries, new_directory, read_json, write_json_atomic
from ..lora import LoRALinear, apply_lora
from .decoders import family_for
from .families import FAMILIES
from .metadata import Keys, show

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_TASK_TYPES = {"decoder-only": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM"}


def _family_and_prefix(cfg: ModelConfig, meta: dict, where: str):
    if cfg.arch == "encoder-only":
        return FAMILIES["bert"], "bert." if cfg.num_labels else ""
    if cfg.arch == "encoder-decoder":
        return FAMILIES["marian"], "model."
    if cfg.positional == "rope" or cfg.norm != "layernorm":
        return family_for(cfg, meta.get("hf_model_type")), "model."
    raise CheckpointError(
        f"{where}: GPT-2 stores its projections transposed (Conv1D); its adapters have no peft form here"
    )


def _modules(model: nn.Module, cfg: ModelConfig, meta: dict, where: str) -> dict[tuple[str, str], str]:
    """(our LoRALinear's name, part) -> the Hugging Face module that part is, for every adapted part."""
    family, prefix = _family_and_prefix(cfg, meta, where)
    table = {mine: theirs.split("|") for mine, theirs, _ in family.names(cfg, prefix)}
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        theirs = table.get(f"{name}.weight")
        if theirs is None or len(theirs) != len(module.parts):
            raise CheckpointError(
                f"{where}: {name} is one module of {len(module.parts)} parts in the Hugging Face "
                f"{getattr(family, 'architecture', family.model_type)} model; its adapters have no peft form here"
            )
        for part, hf_name in zip(module.parts, theirs):
            if part in module.lora_A:
                out[(name, part)] = hf_name.removesuffix(".weight")
    return out


def export_adapter(ckpt: Checkpoint, out: str | Path, overwrite: bool = False) -> Path:
    """Write the adapters of `ckpt` (a LoRA run's checkpoint) as a peft adapter directory."""
    from safetensors.torch import save_file

    cfg, where, out = ckpt.model.config, str(ckpt.path or "checkpoint"), Path(out)  # the model as it is now
    lora = cfg.lora
    if lora is None:
        raise CheckpointError(f"{where}: has no adapters (it was not trained with train.lora)")
    if cfg.arch == "encoder-only" and cfg.num_labels:
        raise CheckpointError(
            f"{where}: a classifier's head is a new layer, not an adapter, and a peft LoRA adapter does not hold it; "
            "merge instead (transformer merge)"
        )
    if lora.train_also:
        raise CheckpointError(
            f"{where}: its adapters train {', '.join(lora.train_also)} too, which a peft LoRA adapter does not "
            "hold; merge them into the weights instead (transformer merge)"
        )
    modules = _modules(ckpt.model, cfg, ckpt.meta, where)
    named = dict(ckpt.model.named_modules())
    tensors = {}
    for (name, part), hf in modules.items():
        module = named[name]
        tensors[f"base_model.model.{hf}.lora_A.weight"] = module.lora_A[part].detach().float().contiguous().cpu()
        tensors[f"base_model.model.{hf}.lora_B.weight"] = module.lora_B[part].detach().float().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": _TASK_TYPES.get(cfg.arch, "SEQ_CLS" if cfg.num_labels else "FEATURE_EXTRACTION"),
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted({hf.rsplit(".", 1)[-1] for hf in modules.values()}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": ckpt.meta.get("imported_from"),
    }

    def not_an_adapter(d: Path):
        return None if (d / CONFIG).is_file() else foreign_entries(d, lambda n: n in (CONFIG, WEIGHTS, "README.md"))

    with new_directory(out, "peft adapter", not_an_adapter, overwrite) as tmp:
        with atomic_path(tmp / WEIGHTS) as path:
            save_file(tensors, str(path), metadata={"format": "pt"})
        write_json_atomic(tmp / CONFIG, config)
    return out


def _refusals(keys: Keys) -> None:
    for key, fine in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False)):
        if keys.flag(key, False) != fine:
            raise keys.error(key, "is true: only plain LoRA adapters are read")
    if keys.text("peft_type", "LORA") != "LORA":
        raise keys.error("peft_type", f"is {show(keys.data['peft_type'])}: only LORA adapters are read")
    if keys.text("bias", "none") != "none":
        raise keys.error("bias", "trains biases too: only adapters with bias 'none' are read")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if keys.data.get(key):
            raise keys.error(key, f"is {show(keys.data[key])}: only one rank and alpha for every module is read")


def load_adapter(model: nn.Module, adapter_dir: str | Path, meta: dict | None = None) -> nn.Module:
    """Put the peft adapter in `adapter_dir` on `model` (unmerged: `lora.merge_lora` folds it in). Every
    tensor of the file must find its module, and every adapted module its tensors. Returns `model`."""
    from safetensors.torch import load_file

    adapter_dir, meta = Path(adapter_dir), meta or {}
    keys = Keys(read_json(adapter_dir / CONFIG, CheckpointError, "missing: not a peft adapter directory"),
                str(adapter_dir / CONFIG))  # fmt: skip
    _refusals(keys)
    try:
        tensors: dict[str, Any] = load_file(str(adapter_dir / WEIGHTS))
    except Exception as e:  # missing, truncated, not safetensors
        raise CheckpointError(f"{adapter_dir / WEIGHTS}: cannot read the adapter's weights ({e})") from None
    r = keys.integer("r")
    plain = model.config
    # which of our parts the file adapts: try every part, keep those whose tensors are there
    probe = apply_lora(_copy_shell(model), LoRAConfig(r=1, targets=["all-linear"]))
    modules = _modules(probe, plain, meta, str(adapter_dir))
    present = {key: hf for key, hf in modules.items() if f"base_model.model.{hf}.lora_A.weight" in tensors}
    if not present:
        raise CheckpointError(f"{adapter_dir / WEIGHTS}: no tensor names a module of this model")
    cfg = LoRAConfig(r=r, alpha=keys.number("lora_alpha", 8), dropout=keys.number("lora_dropout", 0.0),
                     targets=sorted({part for _, part in present}))  # fmt: skip
    apply_lora(model, cfg)
    named = dict(model.named_modules())
    used = set()
    with torch.no_grad():
        for (name, part), hf in modules.items():
            module = named[name]
            if not isinstance(module, LoRALinear) or part not in module.lora_A:
                continue
            for kind in ("lora_A", "lora_B"):
                key = f"base_model.model.{hf}.{kind}.weight"
                if key not in tensors:
                    raise CheckpointError(f"{adapter_dir / WEIGHTS}: missing tensor '{key}'")
                target = getattr(module, kind)[part]
                if tensors[key].shape != target.shape:
                    held, needed = tuple(tensors[key].shape), tuple(target.shape)
                    raise CheckpointError(f"{adapter_dir / WEIGHTS}: tensor '{key}' has shape {held}, needs {needed}")
                target.copy_(tensors[key])
                used.add(key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{adapter_dir / WEIGHTS}: tensor '{unused[0]}' names no module of this model")
    return model


def _copy_shell(model: nn.Module) -> nn.Module:
    """A model of the same shape on the meta device (no memory), to find where adapters can go."""
    from ..model import build_model

    with torch.device("meta"):
        return build_model(dataclasses.replace(model.config, lora=None))


def with_adapter(ckpt: Checkpoint, adapter_dir: str | Path, device: torch.device) -> Checkpoint:
    """`ckpt` with the peft adapter in `adapter_dir` on its model (unmerged), on `device`, in eval mode, its
    config the adapted model's (what `--adapter` does for every command and the server)."""
    load_adapter(ckpt.model, adapter_dir, ckpt.meta)
    ckpt.model.to(device).eval()
    ckpt.config = ckpt.model.config
    return ckpt


__all__ = ["export_adapter", "load_adapter", "with_adapter"]
