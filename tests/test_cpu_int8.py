"""The int8 kernel (cpu/int8.py, cpu/int8_kernel.c): the exact int8 computation, within quantisation's bound of fp32,
every tail of every size, a fallback that holds where it cannot run, and a library loaded only from where no
one else could have written it."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transformer import cpu
from transformer.cpu import int8, machine
from transformer.cpu.linear import int8_weights

FP32_EPS = torch.finfo(torch.float32).eps

needs_kernel = pytest.mark.skipif(
    not int8.available(),
    reason="the int8 VNNI kernel needs Linux on x86-64 with "
    "AVX-512 VNNI (PyTorch dispatching AVX-512) and a C compiler; this machine lacks one",
)

# (rows, inputs, outputs): a step's shapes, and sizes off every multiple the kernel works in (4 rows per register
# block, 4 inputs per VNNI product, 16 outputs per vector, 64 per tile)
SHAPES = [(1, 3, 1), (5, 37, 70), (4, 64, 64), (13, 100, 130), (32, 512, 512), (40, 256, 1000), (7, 2048, 17)]


def _data(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g) * 3, torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu,residual", [(False, False), (True, True)])
def test_kernel_equals_the_exact_int8_computation(shape, relu, residual):
    x, w, b = _data(*shape)
    packed = int8.pack(w, b)
    res = torch.randn(shape[0], shape[2]) if residual else None
    got, want = int8.linear(x, packed, relu, res), int8.reference(x, packed, relu, res)
    # the integer sums are exact in both; what differs is the rounding of the few fp32 operations after them
    # (int32 -> fp32, two scales, bias, residual): a few units of fp32 rounding at the output's scale
    torch.testing.assert_close(got, want, rtol=0, atol=8 * FP32_EPS * float(want.abs().max()))


def test_kernel_is_chosen_wherever_the_cpu_and_a_compiler_allow_it():
    """A kernel that failed its self-test would fall back silently (and skip the tests above): here it must not."""
    if machine.switched_off("VNNI") or not int8._cpu_supports():
        pytest.skip("this CPU (or PyTorch's dispatch, or TRANSFORMER_VNNI=0) rules the kernel out")
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler to build the kernel")
    assert int8.available()


def test_packed_weights_are_each_row_rounded_to_8_bits():
    _, w, b = _data(1, 37, 70)
    packed = int8.pack(w, b)
    q = int8.unpack(packed)  # (70, 37)
    scale = packed.scale[:70, None]
    assert q.shape == (70, 37) and packed.packed.shape == (2, 1, 4, 16, 16, 4)  # padded to 128 x 64
    assert packed.packed.abs().sum() == q.abs().sum()  # the padding is zeros: it adds nothing
    assert bool(((q * scale - w).abs() <= scale / 2 + 1e-7).all())  # round to nearest step
    assert q.abs().amax(1).eq(127).all()  # each row's largest weight is +-127
    torch.testing.assert_close(packed.comp[:70], q.sum(1, dtype=torch.int32) * -128, rtol=0, atol=0)
    assert packed.comp[70:].eq(0).all()
    torch.testing.assert_close(packed.bias[:70], b, rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_is_within_quantisation_error_of_fp32(shape):
    """|y - x W^T| is bounded elementwise by the rounding of x and W to 8 bits: each x[m, k] moves by at most
    half its row's step sx[m], each W[n, k] by half its row's step sw[n]."""
    x, w, b = _data(*shape, seed=1)
    got, want = int8.linear(x, int8.pack(w, b)), F.linear(x, w, b)
    sx = x.abs().amax(1, keepdim=True) / 127  # (M, 1)
    sw = w.abs().amax(1) / 127  # (N,)
    K = x.size(1)
    bound = (sx / 2) * w.abs().sum(1) + x.abs().sum(1, keepdim=True) * (sw / 2) + K * (sx / 2) * (sw / 2)
    slack = 8 * FP32_EPS * float(want.abs().max())  # fp32 rounding of the two results
    assert bool(((got - want).abs() <= bound + slack).all())


def test_amx_is_used_wherever_the_cpu_linux_and_the_compiler_allow_it():
    """A kernel whose AMX path failed its self-test falls back to VNNI alone: here it must not."""
    if not int8.available() or not int8._amx_wanted():
        pytest.skip("no AMX-INT8 on this CPU (or the kernel is off, or TRANSFORMER_AMX=0)")
    if int8.amx_state in ("refused by Linux", "not in this build (the compiler lacks it)"):
        pytest.skip(f"AMX is {int8.amx_state}")
    assert int8.amx_state == "on" and int8.uses_amx()


@pytest.mark.skipif(not int8.uses_amx(), reason="AMX: this CPU lacks it, or Linux did not grant its tile state")
@pytest.mark.parametrize("shape", [(16, 64, 64), (32, 512, 512), (40, 256, 1000), (33, 100, 130)])
def test_amx_and_vnni_give_the_same_result(shape):
    """From 16 rows the kernel multiplies with AMX: the same integer sums and the same float operations after
    them as VNNI, so the same bits."""
    x, w, b = _data(*shape)
    packed, res = int8.pack(w, b), torch.randn(shape[0], shape[2])
    amx = int8.linear(x, packed, True, res)
    with int8.amx_off():
        vnni = int8.linear(x, packed, True, res)
    assert torch.equal(amx, vnni)


@needs_kernel
def test_kernel_takes_any_leading_shape_and_strides():
    x, w, b = _data(6, 40, 24)
    packed = int8.pack(w, None)
    x3 = x.view(2, 3, 40)
    assert int8.linear(x3, packed).shape == (2, 3, 24)
    torch.testing.assert_close(int8.linear(x3, packed).view(6, 24), int8.linear(x, packed))
    wide = torch.randn(6, 80)
    strided = wide[:, ::2]  # every other column: copied to contiguous rows first
    torch.testing.assert_close(int8.linear(strided, packed), int8.linear(strided.contiguous(), packed))
    rows = wide[:, :40]  # a row stride of 80: read in place
    torch.testing.assert_close(int8.linear(rows, packed), int8.linear(rows.contiguous(), packed))
    assert int8.linear(torch.randn(0, 40), packed).shape == (0, 24)
    zeros = int8.linear(torch.zeros(3, 40), int8.pack(w, b))  # a row of zeros: scale 0, output = bias
    torch.testing.assert_close(zeros, b.expand(3, 24))
    with pytest.raises(ValueError, match="expected fp32 CPU input"):
        int8.linear(torch.randn(6, 41), packed)
    with pytest.raises(ValueError, match="expected fp32 CPU input"):
        int8.linear(x.double(), packed)
    with pytest.raises(ValueError, match="residual of shape"):
        int8.linear(x, packed, residual=torch.randn(5, 24))


@needs_kernel
@pytest.mark.parametrize("rows", [3, 20])  # VNNI; AMX where it is on
def test_a_row_with_nan_or_inf_gives_non_finite_outputs_as_fp32_would(rows):
    x, w, b = _data(rows, 100, 70)
    x[1, 37], x[2, 99] = float("nan"), float("inf")
    y = int8.linear(x, int8.pack(w, b))
    assert y[1].isnan().all() and not y[2].isfinite().any()
    assert y[0].isfinite().all() and y[3:].isfinite().all()
    torch.testing.assert_close(y[0], int8.linear(x[:1], int8.pack(w, b))[0], rtol=0, atol=0)


@needs_kernel
def test_a_weight_whose_storage_moves_is_still_read_where_it_is():
    x, w, b = _data(5, 64, 96)
    packed = int8.pack(w, b)
    before = int8.linear(x, packed)
    for t in (packed.packed, packed.comp, packed.scale, packed.bias):
        t.share_memory_()  # moves each tensor to new (shared) memory and frees the old
    torch.testing.assert_close(int8.linear(x, packed), before, rtol=0, atol=0)


@needs_kernel
def test_a_call_from_another_thread_gives_the_same_result():
    import threading

    x, w, b = _data(32, 256, 300)
    packed = int8.pack(w, b)
    want, got = int8.linear(x, packed), []
    thread = threading.Thread(target=lambda: got.append(int8.linear(x, packed)))
    thread.start()
    thread.join()
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)


@needs_kernel
def test_int8_weights_use_the_kernel_in_the_modules():
    from transformer.cpu.linear import Linear

    torch.manual_seed(0)
    layer = Linear(48, 80).eval()
    x = torch.randn(5, 48)
    with torch.no_grad(), int8_weights(layer):
        assert isinstance(layer.prepared.int8, int8.Int8Weight)
        torch.testing.assert_close(layer(x), int8.linear(x, layer.prepared.int8), rtol=0, atol=0)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


@pytest.mark.skipif(not cpu.int8.fbgemm_works(), reason="this PyTorch build or CPU has no fbgemm to fall back to")
def test_turned_off_it_falls_back_to_fbgemm(tmp_path):
    code = (
        "import torch; from transformer.cpu import int8; from transformer.cpu.linear import Linear, int8_weights; "
        "l = Linear(8, 4).eval(); "
        "with_block = int8_weights(l); with_block.__enter__(); "
        "print(int8.available(), type(l.prepared.int8).__name__)"
    )
    out = _python(code, TRANSFORMER_VNNI="0", TRANSFORMER_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "False" and out.stdout.split()[1] != "Int8Weight"
    assert not (tmp_path / "kernels").exists()  # nothing compiled


@needs_kernel
def test_the_library_is_built_once_into_the_cache(tmp_path):
    code = "from transformer.cpu import int8; print(int8.available())"
    first = _python(code, TRANSFORMER_CACHE=str(tmp_path))
    assert first.stdout.strip() == "True", first.stderr[-2000:]
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # the renamed library only: no temporary left
    stamp = built[0].stat().st_mtime_ns
    again = _python(code, TRANSFORMER_CACHE=str(tmp_path))
    assert again.stdout.strip() == "True" and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


@needs_kernel
def test_another_librarys_openmp_does_not_turn_it_off():
    """CTranslate2 brings an OpenMP runtime of its own: the kernel still finds PyTorch's and links that one."""
    pytest.importorskip("ctranslate2")
    out = _python(
        "import ctranslate2, torch; from transformer.cpu import int8; "
        "print(len(int8._openmp_runtimes()), int8.available())"
    )
    assert out.stdout.split() == ["2", "True"], out.stderr[-2000:]


@needs_kernel
def test_an_unwritable_cache_falls_back_to_a_private_temporary_directory(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")  # the cache's parent is a file: nothing can be written under it
    env = dict(TRANSFORMER_CACHE=str(blocked / "c"), TMPDIR=str(tmp_path))
    code = "from transformer.cpu import int8; print(int8.available())"
    out = _python(code, **env)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
    private = tmp_path / f"transformer-{os.getuid()}"
    assert len(list((private / "kernels").iterdir())) == 1 and private.stat().st_mode & 0o777 == 0o700
    private.chmod(0o777)  # open to every user: someone else could have planted a library in it
    assert _python(code, **env).stdout.strip() == "False"


def _toolchain() -> tuple[str, str]:
    """The compiler and PyTorch's OpenMP runtime the kernel would be built with (skips where there are none)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    omp = int8._torch_openmp(int8._openmp_runtimes())
    if not cc or omp is None:
        pytest.skip("no C compiler or no OpenMP runtime of PyTorch's to build a library with")
    return cc, omp


def _planted(tmp_path: Path, cc: str, omp: str) -> tuple[Path, Path, Path]:
    """(cache, library, marker): a library under the very name the kernel's would have in `cache`, whose
    constructor leaves `marker`: loading it at all runs its code, before any self-test could refuse it."""
    cache = tmp_path / "cache"
    library = cache / "kernels" / int8._library_name(cc, omp)
    library.parent.mkdir(parents=True, mode=0o700)
    marker, source = tmp_path / "ran", tmp_path / "planted.c"
    source.write_text(
        f"#include <stdio.h>\n__attribute__((constructor)) static void planted(void) "
        f'{{ fclose(fopen("{marker}", "w")); }}\n'
    )
    subprocess.run([cc, "-shared", "-fPIC", str(source), "-o", str(library)], check=True, capture_output=True)
    library.chmod(0o755)
    return cache, library, marker


def _no_builds(monkeypatch, tmp_path: Path) -> list:
    """The cache at hand, the temporary directory in tmp_path, and builds recorded instead of made."""
    builds = []

    def build(cc, omp, target):
        builds.append(target)
        raise OSError("test: not built")

    monkeypatch.setattr(int8, "_compile", build)
    monkeypatch.setattr(int8.tempfile, "tempdir", str(tmp_path))
    return builds


@pytest.mark.parametrize("opened", ["kernels", "cache"])  # the library's own directory, or one above it
def test_a_library_planted_where_others_can_write_is_not_loaded(tmp_path, monkeypatch, opened):
    cc, omp = _toolchain()
    cache, library, marker = _planted(tmp_path, cc, omp)
    monkeypatch.setenv("TRANSFORMER_CACHE", str(cache))
    builds = _no_builds(monkeypatch, tmp_path)
    (cache / opened if opened == "kernels" else cache).chmod(0o775)  # anyone in the group could have put it there
    with pytest.raises(OSError):
        int8._load(cc, omp)
    assert not marker.exists()
    # built afresh in a private directory instead (here the build fails, and fbgemm would multiply)
    assert builds == [tmp_path / f"transformer-{os.getuid()}" / "kernels" / library.name]
    (cache / "kernels").chmod(0o700)
    cache.chmod(0o700)
    int8._load(cc, omp)  # closed to others, the same library is loaded: it was the check that kept it out
    assert marker.exists()


@pytest.mark.parametrize("owned", ["library", "directory"])
def test_a_library_or_directory_of_someone_elses_is_not_loaded(tmp_path, monkeypatch, owned):
    cc, omp = _toolchain()
    cache, library, marker = _planted(tmp_path, cc, omp)
    monkeypatch.setenv("TRANSFORMER_CACHE", str(cache))
    builds = _no_builds(monkeypatch, tmp_path)
    me = os.getuid()
    if owned == "library":  # as another user would see it: root's file (tests run as root), not theirs
        monkeypatch.setattr(int8.os, "getuid", lambda: me + 4321)
    elif me == 0:
        os.chown(library.parent, 4321, 4321)  # a directory of another user's (neither ours nor root's)
    else:
        pytest.skip("only root can give a directory to another user")
    with pytest.raises(OSError):
        int8._load(cc, omp)
    assert not marker.exists()
    # refused, and built afresh in a private directory instead; as the other user, /tmp's transformer-<uid> is
    # not theirs either (root made it here), so nothing is built: fbgemm would multiply
    private = tmp_path / f"transformer-{me}" / "kernels" / library.name
    assert builds == ([] if owned == "library" else [private])
    monkeypatch.setattr(int8.os, "getuid", lambda: me)
    os.chown(library.parent, me, -1)
    int8._load(cc, omp)
    assert marker.exists()


def test_the_library_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """A crash between the rename and the data reaching the disk must not leave a truncated library under the
    final name: the file's bytes are synced first, then it is renamed, then the directory is synced."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def compiler(cmd, **kwargs):  # writes the output file it is asked for, umask and all
        if "-o" in cmd and cmd[cmd.index("-o") + 1].endswith(".so"):
            out = Path(cmd[cmd.index("-o") + 1])
            out.write_bytes(b"\x7fELF")
            out.chmod(0o777)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(int8.subprocess, "run", compiler)
    monkeypatch.setattr(int8.os, "fsync", fsync)
    monkeypatch.setattr(int8.os, "replace", replace)
    target = tmp_path / "kernels" / "int8_kernel-0123456789abcdef.so"
    target.parent.mkdir()
    int8._compile("cc", "/lib/libgomp.so.1", target)
    ino = target.stat().st_ino
    assert events == [("fsync", ino), ("replace", ino, str(target)), ("fsync", target.parent.stat().st_ino)]
    assert os.listdir(target.parent) == [target.name]  # no temporary left
    assert target.stat().st_mode & 0o777 == 0o755  # closed to others whatever the compiler's umask gave it


def test_the_library_is_named_by_what_it_is_built_from(monkeypatch):
    cc, omp = _toolchain()
    name = int8._library_name(cc, omp)
    assert re.fullmatch(r"int8_kernel-[0-9a-f]{16}\.so", name)
    monkeypatch.setattr(int8.torch, "__version__", "0.0.0-another")
    assert int8._library_name(cc, omp) != name
    monkeypatch.undo()
    monkeypatch.setattr(int8, "_FLAGS", [*int8._FLAGS, "-DANOTHER"])
    assert int8._library_name(cc, omp) != name


def test_cache_directories_are_made_closed_to_others(tmp_path):
    """Made 0700 whatever the umask: a group-writable cache of our own making would be refused."""
    old = os.umask(0o002)
    try:
        int8.make_private_dirs(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert all((tmp_path / d).stat().st_mode & 0o777 == 0o700 for d in ("a", "a/b"))
    assert int8._unsafe_directory(tmp_path / "a" / "b") is None
    (tmp_path / "a").chmod(0o777)
    assert "can be written by others" in int8._unsafe_directory(tmp_path / "a" / "b")


@needs_kernel
def test_a_group_writable_cache_builds_in_a_private_directory(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o775)
    cache.chmod(0o775)
    env = dict(TRANSFORMER_CACHE=str(cache), TMPDIR=str(tmp_path))
    out = _python("from transformer.cpu import int8; print(int8.available())", **env)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
    assert not (cache / "kernels").exists() or not any((cache / "kernels").iterdir())
    assert len(list((tmp_path / f"transformer-{os.getuid()}" / "kernels").iterdir())) == 1
