"""The CPU fast paths, kept out of the readable core (attention.py, layers.py, model.py).

The core's modules build on `Linear`, a drop-in `nn.Linear`; everything else here is chosen per machine by
trying it, and falls back to plain PyTorch:

- `machine`: what this CPU is (model, flags) and every `TRANSFORMER_*` switch, read in one place;
- `timing`: the one timing harness that every per-machine choice uses;
- `decisions`: the one per-machine record of timed choices, so that every process on a machine chooses alike;
- `paths`: whether `Linear`'s fp32 and bf16 products go to oneDNN instead of the default BLAS;
- `linear`: `Linear`, the `PreparedWeights` it keeps inside `packed_weights()` and `int8_weights()` blocks;
- `step`: the encoder-decoder's decoding step, derived from the same layer definitions as `TransformerLayer`;
- `int8`: int8 products, through this package's C kernel (`int8_kernel.c`) or fbgemm;
- `memory`: the allocator and oneDNN cache settings.
"""

from . import decisions, int8, machine, memory, paths, timing
from .linear import Linear, PreparedWeights, int8_weights, packed_weights
from .paths import CpuPaths, cpu_paths, reapply_cpu_paths, set_cpu_paths

__all__ = [
    "decisions",
    "int8",
    "machine",
    "memory",
    "paths",
    "timing",
    "CpuPaths",
    "Linear",
    "PreparedWeights",
    "cpu_paths",
    "int8_weights",
    "packed_weights",
    "reapply_cpu_paths",
    "set_cpu_paths",
]
