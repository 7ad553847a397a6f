"""Whether `Linear` sends fp32 products to oneDNN instead of the default BLAS, decided once per machine.

Three paths: training (an fp32 product and its two backward products), decoding with weights packed once into
oneDNN's blocked layout, and the same under bf16 autocast with bf16-packed weights. Each is decided by *trying
the very operation* (a CPU without the instructions an op needs raises, and the path is off) and then *timing
it against plain `F.linear`* on this machine (`timing`): a path is taken only where it is clearly faster, by
`MARGIN`. Which library wins differs by CPU, so the choice is recorded per machine (`decisions`) and every
later process takes it. `TRANSFORMER_ONEDNN=0` turns every path off; `=1` takes every one that works, untimed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import decisions, machine, timing

log = logging.getLogger("transformer")

# A fast path must beat plain F.linear by this factor: a margin that timing noise on a busy machine does not
# cross, so the same machine makes the same choice from run to run.
MARGIN = 0.85


@dataclass(frozen=True)
class CpuPaths:
    """Which oneDNN paths `Linear` takes on this CPU (see the module docstring)."""

    train: bool = False  # fp32 products of training (forward and both backward products) in oneDNN
    packed: bool = False  # fp32 decoding with weights packed once into oneDNN's layout
    packed_bf16: bool = False  # decoding under bf16 autocast with weights packed once in bf16
    why: str = "off"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "CpuPaths":
        return CpuPaths(bool(data["train"]), bool(data["packed"]), bool(data["packed_bf16"]), str(data.get("why", "")))

    def describe(self) -> str:
        on = [
            n
            for n, v in (
                ("training", self.train),
                ("packed decoding", self.packed),
                ("packed bf16 decoding", self.packed_bf16),
            )
            if v
        ]
        return f"oneDNN for {', '.join(on) if on else 'nothing'} ({self.why})"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN (weight plain or packed by `pack`). Any strides: transposed views cost no
    copy."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` in oneDNN's blocked layout, for products of about `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def works(dtype: torch.dtype) -> bool:
    """Can this CPU run oneDNN's linear, plain and with a packed weight, in `dtype`, with F.linear's result?
    A CPU without the needed instructions raises (e.g. bf16 packing needs AVX512-BF16/AVX-NE-CONVERT).
    Checked outside autocast whatever the caller's context: under bf16 autocast the fp32 reference itself would
    be computed in bf16, and fp32 oneDNN would be found wrong (and recorded so for the whole machine)."""
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            x, w, b = timing.fixed(3, 8, dtype), timing.fixed(5, 8, dtype).cos(), torch.arange(5.0).to(dtype)
            ref = F.linear(x.float(), w.float(), b.float())
            tol = 1e-5 if dtype == torch.float32 else 5e-2
            for out in (onednn_linear(x, w, b), onednn_linear(x, pack(w, 3), b)):
                if not torch.allclose(out.float(), ref, atol=tol, rtol=tol):
                    return False
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def onednn_usable(dtype: torch.dtype = torch.float32) -> bool:
    """Can oneDNN's packed linear run here in `dtype` with F.linear's result (and is oneDNN not turned off by
    TRANSFORMER_ONEDNN=0)? For callers that time it themselves per shape, as the decoding step does."""
    if machine.switched_off("ONEDNN") or not machine.x86_64() or not torch.backends.mkldnn.is_available():
        return False
    return works(dtype)


def _faster(fast: Callable[[], object], plain: Callable[[], object]) -> tuple[bool, float]:
    """(fast clearly beats plain, fast time / plain time)."""
    best = timing.best_times({"fast": fast, "plain": plain}, rounds=10)
    return best["fast"] <= MARGIN * best["plain"], best["fast"] / best["plain"]


def decide() -> CpuPaths:
    """The paths for this machine, tried and timed now (`cpu_paths` records them once per machine)."""
    if machine.switched_off("ONEDNN"):
        return CpuPaths(why="TRANSFORMER_ONEDNN=0")
    if not machine.x86_64() or not torch.backends.mkldnn.is_available():
        return CpuPaths(why="not an x86-64 CPU with oneDNN: the platform's BLAS is used")
    fp32, bf16 = works(torch.float32), works(torch.bfloat16)
    if not fp32:
        return CpuPaths(why="oneDNN's linear is unavailable in this torch build")
    if machine.switched_on("ONEDNN"):
        return CpuPaths(True, True, bf16, why="TRANSFORMER_ONEDNN=1")
    fixed = timing.fixed
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        # training: a feed-forward-sized product and its two backward products (d_model 256, 512 tokens)
        x, w, g = fixed(512, 256), fixed(1024, 256), fixed(512, 1024)
        train, r_train = _faster(
            lambda: (onednn_linear(x, w), onednn_linear(g, w.t()), onednn_linear(g.t(), x.t())),
            lambda: (F.linear(x, w), g.mm(w), g.t().mm(x)),
        )
        # decoding: 32 rows at a time against a packed weight
        xd, wd = fixed(32, 512), fixed(1536, 512)
        pw = pack(wd, 32)
        packed, r_packed = _faster(lambda: onednn_linear(xd, pw), lambda: F.linear(xd, wd))
        packed_bf16, r_bf16 = False, float("nan")
        if bf16:
            xb, wb = xd.bfloat16(), wd.bfloat16()
            pb = pack(wb, 32)
            packed_bf16, r_bf16 = _faster(lambda: onednn_linear(xb, pb), lambda: F.linear(xb, wb))
    why = (
        f"timed against F.linear: training products {r_train:.2f}x the time, packed decoding {r_packed:.2f}x, "
        + (f"packed bf16 {r_bf16:.2f}x" if bf16 else "bf16 packing unsupported on this CPU")
        + f"; used where below {MARGIN}x"
    )
    return CpuPaths(train, packed, packed_bf16, why)


def _still_valid(saved: object) -> bool:
    try:
        paths = CpuPaths.from_dict(saved)  # type: ignore[arg-type]
    except (TypeError, KeyError):
        return False
    return (not paths.train and not paths.packed) or works(torch.float32)  # still true of this build


def _decide_once() -> CpuPaths:
    """The timed decision, made once per machine and then read back from `decisions`. TRANSFORMER_ONEDNN=0/1
    is decided without timing."""
    if machine.switch("ONEDNN") != "auto":
        return decide()
    try:
        saved = decisions.recorded("paths", "oneDNN", lambda: decide().to_dict(), _still_valid)
    except OSError as e:  # an unwritable cache: decided again by the next process
        log.debug("could not keep the CPU paths decision in %s (%s)", decisions.path(), e)
        return decide()
    paths = CpuPaths.from_dict(saved)
    return dataclasses.replace(paths, why=f"{paths.why}; decided once for this machine, {decisions.path()}")


_paths: Optional[CpuPaths] = None


def cpu_paths() -> CpuPaths:
    """This process's CPU fast paths: decided on first use (about 0.1 s, once per machine) and then fixed."""
    global _paths
    if _paths is None:
        _paths = _decide_once()
        log.debug("CPU fast paths: %s", _paths.describe())
    return _paths


def set_cpu_paths(paths: Optional[CpuPaths]) -> None:
    """Fix the CPU fast paths by hand (tests, the bench; None decides again on next use)."""
    global _paths
    _paths = paths


def reapply_cpu_paths(saved: Optional[dict]) -> Optional[str]:
    """Resume a run on the CPU paths it was trained with (`CpuPaths.to_dict()` as saved in its `last/`), so
    its products sum in the same order as before it stopped. Paths this machine cannot run stay off. Returns a
    line for the log when the saved paths differ from the ones this process had."""
    if not saved:
        return None
    want = CpuPaths.from_dict(saved)
    fp32, bf16 = onednn_usable(torch.float32), onednn_usable(torch.bfloat16)
    paths = CpuPaths(
        want.train and fp32, want.packed and fp32, want.packed_bf16 and bf16, why=f"as the run was trained ({want.why})"
    )

    def chosen(p: CpuPaths) -> tuple[bool, bool, bool]:
        return p.train, p.packed, p.packed_bf16

    before = cpu_paths()
    set_cpu_paths(paths)
    if chosen(before) == chosen(paths):
        return None
    lost = (
        ""
        if chosen(paths) == chosen(want)
        else " (some are unavailable here: the run will not continue bit-identically)"
    )
    return f"CPU fast paths set as the run was trained: {paths.describe()}{lost}"
