"""Low-rank adaptation (LoRA): fine-tune a large model by training a small update of each targeted projection.

A projection y = x W^T + b becomes y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with A (r x in) and B
(out x r) trained and W frozen. B starts at zero, so training starts from the pretrained model exactly. The
update of a d x d matrix costs 2 r d parameters instead of d^2, and only those get gradients and optimizer state.

This package fuses some projections (q, k and v in one matrix; gate and up in one), so an adapter may cover
only some parts of a weight's output rows: `LoRALinear` keeps one (A, B) pair per targeted part, named as the
part is ("q", "v", "gate", ...), each adding to its own rows. That is what peft does with the separate
matrices of Hugging Face models (`interop/peft.py` converts between the two).

`apply_lora(model, cfg)` swaps the targeted `Linear`s for `LoRALinear`s that share their weights;
`merge_lora(model)` folds the updates into the weights and swaps back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .config import LoRAConfig, ModelConfig
from .cpu.linear import Linear
from .dropout import dropout

# each projection: where it is in a layer, and the parts (name, index among the fused matrices) of its rows
_ATTENTION = {"qkv_proj": ("q", "k", "v"), "q_proj": ("q",), "kv_proj": ("k", "v"), "out_proj": ("o",)}


def _parts(name: str, module: nn.Module, layer: nn.Module) -> tuple[str, ...]:
    """The names of the parts of `module`'s output rows (`name` is its attribute name in its parent)."""
    if name in _ATTENTION:
        return _ATTENTION[name]
    if name == "linear1":
        return ("gate", "up") if layer.ff.gated else ("up",)
    return ("down",)


def _wanted(targets: list[str]) -> set[str]:
    if "all-linear" in targets:
        return {"q", "k", "v", "o", "gate", "up", "down"}
    wanted = set(targets) - {"ffn"}
    return wanted | ({"gate", "up", "down"} if "ffn" in targets else set())


class LoRALinear(Linear):
    """A `Linear` whose output rows get low-rank updates, one per adapted part.

    Args:
        base: the Linear whose weight and bias it shares (frozen by the caller, not here).
        parts: all the parts of the output rows in order, e.g. ("q", "k", "v"), with their sizes `sizes`.
        adapted: the parts that get an adapter.
        cfg: rank, alpha, dropout.
    Parameters `lora_A.<part>` (r, in) and `lora_B.<part>` (size, r)."""

    def __init__(
        self, base: Linear, parts: tuple[str, ...], sizes: list[int], adapted: set[str], cfg: LoRAConfig
    ) -> None:
        with torch.device("meta"):  # no weight of its own is allocated: it takes the base's
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias  # the same parameters (tied ones stay tied)
        self.parts, self.sizes = parts, sizes
        self.scaling, self.p = cfg.scaling, cfg.dropout
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for part, size in zip(parts, sizes):
            if part in adapted:
                a = torch.empty(cfg.r, base.in_features, device=base.weight.device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear initialises (and peft: A random, B 0)
                self.lora_A[part] = nn.Parameter(a)
                self.lora_B[part] = nn.Parameter(torch.zeros(size, cfg.r, device=base.weight.device))

    def delta(self) -> Tensor:
        """The update of the whole weight, (out, in): each adapted part's (alpha / r) B A in its rows, 0 elsewhere."""
        rows = []
        for part, size in zip(self.parts, self.sizes):
            if part in self.lora_A:
                rows.append(self.lora_B[part] @ self.lora_A[part] * self.scaling)
            else:
                rows.append(self.weight.new_zeros(size, self.in_features))
        return torch.cat(rows).to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        h = dropout(x, self.p if self.training else 0.0)
        # every adapted part at once: x A^T with the parts' A stacked (.., P r), then one product with their B laid
        # out block-diagonally over the output rows (zeros for the rows of parts without an adapter), added to y
        a = torch.cat([self.lora_A[p] for p in self.parts if p in self.lora_A])
        blocks = [
            self.lora_B[p] if p in self.lora_A else self.weight.new_zeros(n, 0) for p, n in zip(self.parts, self.sizes)
        ]
        b = torch.block_diag(*blocks) * self.scaling  # (out, P r)
        z = h.reshape(-1, h.size(-1)).to(a.dtype) @ a.t()
        out = torch.addmm(y.reshape(-1, y.size(-1)), z.to(y.dtype), b.t().to(y.dtype))
        return out.view_as(y)


def _projections(model: nn.Module) -> Iterator[tuple[nn.Module, str, Linear, nn.Module]]:
    """(parent, attribute name, Linear, the TransformerLayer it is in) of every projection in the layers."""
    from .layers import TransformerLayer

    for layer in model.modules():
        if not isinstance(layer, TransformerLayer):
            continue
        for attn in (layer.self_attn, layer.cross_attn):
            if attn is not None:
                for name in ("qkv_proj", "q_proj", "kv_proj", "out_proj"):
                    if isinstance(getattr(attn, name, None), Linear):
                        yield attn, name, getattr(attn, name), layer
        for name in ("linear1", "linear2"):
            yield layer.ff, name, getattr(layer.ff, name), layer


def _sizes(name: str, module: Linear, parent: nn.Module, parts: tuple[str, ...]) -> list[int]:
    if name == "qkv_proj":
        return list(parent.split)
    if name == "kv_proj":
        return list(parent.split[1:])
    return [module.out_features // len(parts)] * len(parts)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Put adapters on the projections `cfg.targets` names (in place; returns `model`, its config's `lora`
    set). The model's own weights are shared, not copied; freezing them is the trainer's
    (`trainable_parameters`)."""
    if isinstance(getattr(model, "config", None), ModelConfig) and model.config.lora != cfg:
        model.config = dataclasses.replace(model.config, lora=cfg)
    wanted = _wanted(cfg.targets)
    for parent, name, module, layer in list(_projections(model)):
        parts = _parts(name, module, layer)
        adapted = wanted & set(parts)
        if adapted and not isinstance(module, LoRALinear):
            setattr(parent, name, LoRALinear(module, parts, _sizes(name, module, parent, parts), adapted, cfg))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + (alpha / r) B A) and put plain `Linear`s back; the model's
    config loses its `lora`. In place; returns `model`."""
    for parent, name, module, _ in list(_projections(model)):
        if isinstance(module, LoRALinear):
            plain = Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight, plain.bias = module.weight, module.bias
            with torch.no_grad():
                plain.weight.add_(module.delta())
            setattr(parent, name, plain)
    if isinstance(getattr(model, "config", None), ModelConfig):
        model.config = dataclasses.replace(model.config, lora=None)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def trainable_parameters(model: nn.Module, cfg: LoRAConfig, also: frozenset[str] = frozenset()) -> list[str]:
    """Freeze everything but the adapters (and the head and norms if `cfg.train_also` says so, and the
    parameters named in `also`: layers a pretrained model did not provide); returns the names of what trains."""
    from .norms import RMSNorm

    norms = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, RMSNorm)) for p in m.parameters()}
    heads = set()
    for attr in ("output", "classifier", "pooler"):
        head: Optional[nn.Module] = getattr(model, attr, None)
        if head is not None:
            heads |= {id(p) for p in head.parameters()}
    names = []
    for name, p in model.named_parameters():
        train = ".lora_A." in name or ".lora_B." in name
        train |= "norms" in cfg.train_also and id(p) in norms
        train |= "head" in cfg.train_also and id(p) in heads
        train |= name in also
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names
