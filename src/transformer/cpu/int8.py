"""int8 products for decoding on AVX-512 CPUs: a small C kernel (`int8_kernel.c`), compiled on first use.

Decoding multiplies a few rows by every weight at every step, so in int8 it is bound by how fast a product of a
few rows is. PyTorch's int8 linear (fbgemm's dynamic quantisation) spends much of such a product on fixed
costs and multiplies with VNNI at best. The kernel quantises the rows and multiplies them in one pass, with AVX-512
VNNI, and from 16 rows with AMX where the CPU has it (`python -m bench int8` times it against fbgemm at
decoding's shapes). Weights are quantised as fbgemm's are (each output
row scaled to [-127, 127]); inputs get a scale per row instead of fbgemm's one per tensor.

The kernel is used only where all of these hold, and fbgemm is used otherwise: for every int8 product of the
process alike, since the two round inputs differently (which one multiplies is decided by these rules, never
by a timing, so that every process on a machine decodes alike: `kind()`):
- Linux on x86-64, with PyTorch dispatching AVX-512 kernels and the CPU reporting AVX-512 VNNI and BW (so the
  kernel never meets a CPU without its instructions; `ATEN_CPU_CAPABILITY=avx2` turns it off too); AMX only
  where the CPU reports AMX-INT8 and Linux grants its tile state (`TRANSFORMER_AMX=0` keeps to VNNI);
- a C compiler (`$CC`, else `cc`) that builds it; the library is cached under `files.cache_root()`
  (`$TRANSFORMER_CACHE`, else `$XDG_CACHE_HOME/transformer`, else `~/.cache/transformer`), named by a digest
  of the source, the flags, the torch version, the compiler and the OpenMP runtime, and written whole
  (temporary file, fsync, rename);
- the library and its directories are safe to load from (`_unsafe_directory`, `_unsafe_file`): loading a
  library runs its code (its constructors run inside `ctypes.CDLL`, before any self-test), so a library someone
  else could have written is never loaded. The file must be this user's and writable by no one else; each
  directory from it up to the home directory (or /) must be this user's or root's and writable by no one else,
  unless it is root's and sticky, like /tmp. Where the cache fails that, the kernel is built in a private
  directory under the system's temporary directory instead (and where that fails too, fbgemm is used), with a
  warning that says why;
- PyTorch's OpenMP runtime can be found among those loaded and linked, so the kernel shares PyTorch's threads
  (and its thread count);
- its result on fixed inputs equals the exact int8 computation (`reference`), with AMX and without;
- `TRANSFORMER_VNNI` is not 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..files import cache_root, make_private_dirs
from . import machine
from .timing import fixed

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("int8_kernel.c")
# -ffp-contract=off: the float operations after the integer sums exactly as written, in every copy of them (the
# AMX and VNNI paths give the same bits)
_FLAGS = [
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512vnni",
    "-mfma",
    "-ffp-contract=off",
    "-fopenmp",
    "-fPIC",
]
_TILE = 64  # outputs per tile and inputs per chunk of the packed weight (int8_kernel.c)


@dataclass(frozen=True)
class Int8Weight:
    """A weight (out_features, in_features) packed for the kernel, with its bias. Padded sizes: Np and Kp,
    out_features and in_features rounded up to multiples of 64.

    packed: (Np / 64, Kp / 64, 4, 16, 16, 4) int8: 64 outputs, 64 inputs, 16 outputs, 4 inputs, output, input
        (each [i, j, v] an AMX tile of 1 KB; `unpack` undoes it).
    comp: (Np,) int32, -128 times each row's sum: undoes the +128 shift of the quantised input.
    scale: (Np,) fp32, each row's scale (its largest magnitude / 127). bias: (Np,) fp32 or None.
    struct: the same for the C side (int8_kernel.c's int8_weight): the sizes, and the tensors' addresses, which
        `linear` fills in at each call (storage can move: `share_memory_()`)."""

    packed: Tensor
    comp: Tensor
    scale: Tensor
    bias: Optional[Tensor]
    out_features: int
    in_features: int
    struct: "_WeightStruct"


class _WeightStruct(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("comp", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("K", ctypes.c_int64),
        ("Kp", ctypes.c_int64),
        ("N", ctypes.c_int64),
        ("Np", ctypes.c_int64),
    ]


def _row_scales(w: Tensor) -> Tensor:
    """Each output row's scale: its largest magnitude maps to 127."""
    return w.abs().amax(dim=1).clamp(min=1e-12) / 127.0


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) weight -> its int8 values (N, K) and each row's scale (N,), the largest magnitude mapped to 127."""
    w = weight.detach().float()
    scale = _row_scales(w)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def pack_fbgemm(weight: Tensor, bias: Optional[Tensor] = None):
    """The same int8 weights packed for PyTorch's int8 linear (`torch.ops.quantized.linear_dynamic`, fbgemm):
    the fallback where the kernel does not run."""
    w = weight.detach().float()
    scale = _row_scales(w)
    with warnings.catch_warnings():  # torch >= 2.12 warns that quantized tensors will move out of the core
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(w, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())


def pack(weight: Tensor, bias: Optional[Tensor] = None) -> Int8Weight:
    """Quantise and lay out `weight` (N, K) and `bias` (N,) for `linear`."""
    N, K = weight.shape
    q, scale = quantize_weight(weight)
    Np, Kp = -(-N // _TILE) * _TILE, -(-K // _TILE) * _TILE
    padded = torch.zeros(Np, Kp, dtype=torch.int8)
    padded[:N, :K] = q
    comp = torch.zeros(Np, dtype=torch.int32)
    comp[:N] = q.to(torch.int32).sum(1) * -128
    scales = torch.zeros(Np)
    scales[:N] = scale
    b = None
    if bias is not None:
        b = torch.zeros(Np)
        b[:N] = bias.detach().float()
    # (tile, vector, output, chunk, group, input) -> (tile, chunk, vector, group, output, input)
    packed = padded.view(Np // 64, 4, 16, Kp // 64, 16, 4).permute(0, 3, 1, 4, 2, 5).contiguous()
    return Int8Weight(packed, comp, scales, b, N, K, _WeightStruct(K=K, Kp=Kp, N=N, Np=Np))


def unpack(w: Int8Weight) -> Tensor:
    """The int8 values of a packed weight, (out_features, in_features)."""
    Np, Kp = w.comp.numel(), w.packed.size(1) * 64
    return w.packed.permute(0, 2, 4, 1, 3, 5).reshape(Np, Kp)[: w.out_features, : w.in_features]


def linear(x: Tensor, w: Int8Weight, relu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
    """relu?(x W^T + b) + residual with `w` from `pack`, the rows of x quantised to int8 on the fly.

    Args:
        x: (..., in_features) fp32 on CPU.
        relu: apply ReLU before the residual is added.
        residual: (..., out_features) fp32, or None.
    Returns:
        (..., out_features) fp32.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the int8 kernel is not available here; check int8.available() first")
    return _call(lib, x, w, relu, residual)


def _call(lib: ctypes.CDLL, x: Tensor, w: Int8Weight, relu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
    K, N = w.in_features, w.out_features
    # the C side trusts these: a wrong dtype, device or size would have it read or write out of bounds
    if x.dtype is not torch.float32 or not x.is_cpu or x.size(-1) != K:
        raise ValueError(
            f"int8.linear: expected fp32 CPU input (..., {K}), got {x.dtype} {tuple(x.shape)} on {x.device}"
        )
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.size(0)
    y = torch.empty(M, N)
    r = None
    if residual is not None:
        r = residual if residual.dim() == 2 else residual.reshape(-1, residual.size(-1))
        if r.dtype is not torch.float32 or not r.is_cpu or r.stride(1) != 1:
            r = r.to("cpu", torch.float32).contiguous()
        if r.shape != y.shape:
            raise ValueError(
                f"int8.linear: residual of shape {tuple(residual.shape)} for an output of {(*x.shape[:-1], N)}"
            )
    st = w.struct
    st.w, st.comp, st.scale = w.packed.data_ptr(), w.comp.data_ptr(), w.scale.data_ptr()
    st.bias = None if w.bias is None else w.bias.data_ptr()
    if M and lib.int8_linear(
        ctypes.addressof(st),
        x2.data_ptr(),
        x2.stride(0),
        M,
        y.data_ptr(),
        N,
        None if r is None else r.data_ptr(),
        0 if r is None else r.stride(0),
        relu,
        torch.get_num_threads(),
    ):
        raise MemoryError("int8.linear: out of memory for the quantised input")
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


def reference(x: Tensor, w: Int8Weight, relu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
    """What `linear` computes, in PyTorch operations, with the integer products summed exactly (float64): the
    kernel's result must equal this up to the rounding of its last float operations."""
    K, N = w.in_features, w.out_features
    x2 = x.reshape(-1, K).float()
    amax = x2.abs().amax(1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # fp32, as the kernel computes it
    xq = torch.round(x2 * inv[:, None])
    wq = unpack(w)
    acc = (xq.double() @ wq.double().t()).float()
    y = acc * ((amax / 127.0)[:, None] * w.scale[:N])
    if w.bias is not None:
        y = y + w.bias[:N]
    if relu:
        y = torch.relu(y)
    if residual is not None:
        y = y + residual.reshape(-1, N)
    return y.view(*x.shape[:-1], N)


def available() -> bool:
    """Can this machine run the kernel (see the module's docstring)? Decided once per process."""
    return _library() is not None


@functools.cache
def fbgemm_works() -> bool:
    """Can this build run an int8 linear (fbgemm's dynamic quantisation), giving F.linear's result within
    8-bit rounding? Tried once."""
    try:
        x, w = fixed(3, 8), fixed(5, 8).cos()
        out = torch.ops.quantized.linear_dynamic(x, pack_fbgemm(w, None))
        return bool(torch.allclose(out, torch.nn.functional.linear(x, w), atol=0.05))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def kind() -> Optional[str]:
    """How this machine multiplies in int8, by rule and never by a timing (the two round inputs differently):
    "vnni", this package's kernel, where it runs; else "fbgemm" where PyTorch's int8 kernels work; else None."""
    if available():
        return "vnni"
    return "fbgemm" if fbgemm_works() else None


def _cpu_supports() -> bool:
    if platform.system() != "Linux" or not machine.x86_64():
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # PyTorch's own check (CPU and OS), or the user's cap
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= machine.cpu_flags()


def _openmp_runtimes() -> list[str]:
    """The OpenMP runtimes loaded in this process, from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp5")))


def _torch_openmp(runtimes: list[str]) -> Optional[str]:
    """PyTorch's OpenMP runtime among those loaded: the one shipped inside the torch package, or the only one.
    (Other libraries may bring their own, CTranslate2 for one; the kernel must share PyTorch's threads.)"""
    home = os.path.realpath(os.path.dirname(torch.__file__)) + os.sep  # /proc/self/maps names real paths
    inside = [p for p in runtimes if os.path.realpath(p).startswith(home)]
    if len(inside) == 1:
        return inside[0]
    return runtimes[0] if len(runtimes) == 1 else None


def _cache_dir() -> Path:
    return cache_root() / "kernels"


def _library_name(cc: str, omp: str) -> str:
    """The library's file name: a digest of everything it is built from, so that a name always means the same
    build (a file left by another source, flags, torch or compiler is never taken for this one)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), " ".join(_FLAGS), torch.__version__, version, omp]).encode())
    return f"int8_kernel-{key.hexdigest()[:16]}.so"


def _compile(cc: str, omp: str, target: Path) -> None:
    """Build the library into `target` (a temporary file, fsynced, renamed into place: never a half-written one,
    even after a crash). Linked against PyTorch's own OpenMP runtime by path, so that loading it adds no second
    one."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = os.path.join(tmp, "int8_kernel.o"), os.path.join(tmp, "int8_kernel.so")
        try:
            subprocess.run([cc, *_FLAGS, "-c", str(_SOURCE), "-o", obj], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:  # a compiler without AMX's intrinsics (GCC < 11): VNNI alone
            subprocess.run(
                [cc, *_FLAGS, "-DINT8_NO_AMX", "-c", str(_SOURCE), "-o", obj],
                check=True,
                capture_output=True,
                timeout=120,
            )
        subprocess.run(
            [cc, "-shared", obj, "-o", lib, omp, f"-Wl,-rpath,{os.path.dirname(omp)}"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.chmod(lib, 0o755)  # whatever the umask: `_unsafe_file` refuses a library others may write
        with open(lib, "rb") as f:
            os.fsync(f.fileno())  # its bytes on disk before its name points at them
        os.replace(lib, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # and the rename itself
    finally:
        os.close(fd)


def _unsafe_directory(directory: Path) -> Optional[str]:
    """Why a file in `directory` could have been put there by someone other than this user (or root), or None:
    it and each directory above it, up to the home directory or /, must be this user's or root's and closed to
    writes by others, unless root's and sticky (/tmp: no one can replace another's entries). Followed through
    symbolic links to where the directories are."""
    home = os.path.realpath(os.path.expanduser("~"))
    d = os.path.realpath(directory)
    while True:
        st = os.stat(d)
        if st.st_uid not in (os.getuid(), 0):
            return f"{d} belongs to another user (uid {st.st_uid})"
        if st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and st.st_uid == 0):
            return f"{d} can be written by others ({stat.filemode(st.st_mode)})"
        if d in (home, os.path.dirname(d)):  # the home directory, or /
            return None
        d = os.path.dirname(d)


def _unsafe_file(library: Path) -> Optional[str]:
    """Why `library` could have been written by someone else, or None where it is a regular file of this user's
    that no one else may write (not a link: what it points to could be anyone's)."""
    st = os.lstat(library)
    if not stat.S_ISREG(st.st_mode):
        return f"{library} is not a regular file"
    if st.st_uid != os.getuid():
        return f"{library} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"{library} can be written by others ({stat.filemode(st.st_mode)})"
    return None


def _load(cc: str, omp: str) -> ctypes.CDLL:
    """The built library, from the cache (built there first if need be); where the cache cannot be written, holds
    a broken file or is not safe to load from (see the module's docstring), from a private directory of this
    user's under the system's temporary directory. Raises OSError where neither gives one."""
    name = _library_name(cc, omp)

    def built_in(directory: Path) -> ctypes.CDLL:
        make_private_dirs(directory)
        # checked before loading: `ctypes.CDLL` runs the library's constructors, before any self-test could
        why = _unsafe_directory(directory)
        if why is None:
            if not (directory / name).exists():
                _compile(cc, omp, directory / name)
            why = _unsafe_file(directory / name)
        if why is not None:
            log.warning("int8 kernel: not loading %s: %s", directory / name, why)
            raise PermissionError(why)
        return ctypes.CDLL(str(directory / name))

    try:
        return built_in(_cache_dir())
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / f"transformer-{os.getuid()}"
        log.debug("int8 kernel: cache %s unusable (%s); trying %s", _cache_dir(), e, fallback)
    _private(fallback)  # a shared directory: only a directory of ours, closed to others
    return built_in(fallback / "kernels")


def _private(directory: Path) -> None:
    """Make `directory` (0700) or check that it is this user's own and closed to others: under a shared
    temporary directory another user could otherwise plant the library that gets loaded."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{directory} is not a private directory of this user's")


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    if machine.switched_off("VNNI") or not _cpu_supports():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    runtimes = _openmp_runtimes()
    omp = _torch_openmp(runtimes)
    if not cc or omp is None:
        log.debug("int8 kernel: no C compiler (%s) or no OpenMP runtime of PyTorch's among %s", cc, runtimes)
        return None
    try:
        lib = _load(cc, omp)
        f, init = lib.int8_linear, lib.int8_init
    except (OSError, subprocess.SubprocessError, AttributeError) as e:  # AttributeError: a library of another build
        log.debug("int8 kernel unavailable: %s", e)
        return None
    if _openmp_runtimes() != runtimes:  # it brought its own OpenMP: two thread pools would fight over the cores
        log.debug("int8 kernel: loading it added an OpenMP runtime; not used")
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    f.restype, f.argtypes = ctypes.c_int, [ptr, ptr, i64, i64, ptr, i64, ptr, i64, ctypes.c_bool, ctypes.c_int]
    init.restype, init.argtypes = ctypes.c_int, [ctypes.c_int]
    global amx_state
    if _set_amx(lib, True):
        if _self_test(lib):
            return lib
        amx_state = "failed its self-test"
    _set_amx(lib, False)  # VNNI alone
    return lib if _self_test(lib) else None


def _amx_wanted() -> bool:
    """AMX where the CPU has it, unless TRANSFORMER_AMX=0 (the kernel then multiplies with VNNI only)."""
    if machine.switched_off("AMX"):
        return False
    return {"amx_tile", "amx_int8"} <= machine.cpu_flags()


def _set_amx(lib: ctypes.CDLL, on: bool) -> bool:
    global _amx, amx_state
    status = lib.int8_init(int(on and _amx_wanted()))  # Linux must grant the tile state, once per process
    _amx = status == 1
    if on:
        amx_state = {
            1: "on",
            0: "not on this CPU (or TRANSFORMER_AMX=0)",
            -1: "refused by Linux",
            -2: "not in this build (the compiler lacks it)",
        }[status]
    return _amx


_amx = False
amx_state = "not tried"  # why the kernel does or does not use AMX here (tests, bench)


def uses_amx() -> bool:
    """Does the kernel multiply 16 rows and more with AMX here?"""
    return available() and _amx


@contextlib.contextmanager
def amx_off() -> Iterator[None]:
    """Within the block the kernel multiplies with VNNI only (tests compare the two)."""
    lib = _library()
    was = _amx
    if lib is not None:
        _set_amx(lib, False)
    try:
        yield
    finally:
        if lib is not None:
            _set_amx(lib, was)


def _self_test(lib: ctypes.CDLL) -> bool:
    """Does the built kernel give the exact int8 computation on a fixed input (odd sizes: every tail)?"""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(70, 137, generator=g), torch.randn(70, generator=g)
    w = pack(weight, bias)
    ok = True
    for rows in (7, 37):  # VNNI; from 16 rows AMX, where it is on
        x, res = torch.randn(rows, 137, generator=g), torch.randn(rows, 70, generator=g)
        out = _call(lib, x, w, relu=True, residual=res)
        ok = ok and bool(torch.allclose(out, reference(x, w, relu=True, residual=res), rtol=1e-5, atol=1e-5))
    if not ok:
        log.debug("int8 kernel failed its self-test; not used")
    return ok
