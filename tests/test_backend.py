"""transformer.backend: device and precision choices, and CPU fast paths that fall back instead of crashing."""

import os
import subprocess
import sys

import pytest
import torch

from transformer import TransformerError, backend, cpu


def test_device_choices():
    assert backend.resolve_device("cpu") == torch.device("cpu")
    assert backend.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu0", "cuda:x"):
        with pytest.raises(TransformerError, match="expected auto, cpu, cuda or cuda:N"):
            backend.resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_a_missing_gpu_says_why():
    with pytest.raises(TransformerError, match="no CUDA GPU is visible.*use --device cpu"):
        backend.resolve_device("cuda")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch, native, expected):
    monkeypatch.setattr(backend, "native_bf16_cpu", lambda: native)
    p = backend.resolve_precision("auto", torch.device("cpu"))
    assert p.dtype == expected and p.reason.startswith("auto:")
    assert backend.resolve_precision("fp32", torch.device("cpu")).dtype == torch.float32


def test_asking_for_emulated_bf16_warns(monkeypatch, caplog):
    monkeypatch.setattr(backend, "native_bf16_cpu", lambda: False)
    with caplog.at_level("WARNING", logger="transformer"):
        p = backend.resolve_precision("bf16", torch.device("cpu"))
    assert p.bf16 and "emulated" in caplog.text


def test_a_failing_op_turns_its_path_off(monkeypatch):
    # what an AVX2 CPU does when asked to pack bf16 weights (torch 2.13): the op raises
    real = cpu.paths.pack

    def pack(w, rows):
        if w.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")
        return real(w, rows)

    monkeypatch.setattr(cpu.paths, "pack", pack)
    assert not cpu.paths.works(torch.bfloat16)
    monkeypatch.setenv("TRANSFORMER_ONEDNN", "1")
    assert not cpu.paths.decide().packed_bf16


def test_a_first_product_under_bf16_autocast_decides_as_without_it():
    # the first product of a process may come under autocast (a bf16 training step): the check that oneDNN's
    # fp32 linear works must not compare it against a bf16 reference and turn it off for the whole machine
    plain = cpu.paths.works(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu.paths.works(torch.float32) == plain
        assert cpu.paths.works(torch.bfloat16) == cpu.paths.works(torch.bfloat16)


def test_environment_switches(monkeypatch):
    monkeypatch.setenv("TRANSFORMER_ONEDNN", "0")
    assert cpu.paths.decide() == cpu.CpuPaths(why="TRANSFORMER_ONEDNN=0")
    monkeypatch.setenv("TRANSFORMER_ONEDNN", "1")
    forced = cpu.paths.decide()
    assert forced.train == forced.packed == cpu.paths.works(torch.float32)


@pytest.mark.skipif(not cpu.paths.works(torch.float32), reason="no oneDNN linear in this torch build or CPU")
def test_decoding_under_bf16_on_a_cpu_limited_to_avx2():
    """oneDNN limited to AVX2 (as on a CPU without AVX-512) refuses bf16 packing: the probe must see that, and
    bf16 decoding must still work, through plain F.linear."""
    code = (
        "import torch; from transformer import cpu, ModelConfig, Transformer; "
        "from transformer.generate import greedy; "
        "p = cpu.cpu_paths(); assert not p.packed_bf16, p; "
        "m = Transformer(ModelConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=32, n_heads=2, "
        "n_encoder_layers=1, n_decoder_layers=1, d_ff=32)).eval(); "
        "src = torch.randint(4, 20, (3, 5)); "
        "ctx = torch.autocast('cpu', dtype=torch.bfloat16); ctx.__enter__(); out = greedy(m, src, max_len_b=4); "
        "print(len(out))"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "TRANSFORMER_ONEDNN": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr[-2000:]


def test_the_machine_is_described():
    text = backend.cpu_description()
    assert "bf16" in text
    paths = cpu.cpu_paths()
    assert paths.describe().startswith("oneDNN for ")


_MMAPPED_AFTER_16MB = """
import ctypes
from transformer import cpu
print(cpu.memory.tune_allocator())
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblkhd
libc.malloc(16 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only")
def test_the_tuned_allocator_serves_large_blocks_from_its_heap():
    """After tune_allocator() a 16 MB block comes from the heap (reusable), not from a fresh mmap; with
    TRANSFORMER_MALLOC=0 or the user's own MALLOC_* settings it is left alone."""

    def run(**env):
        base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "TRANSFORMER_MALLOC"}
        out = subprocess.run(
            [sys.executable, "-c", _MMAPPED_AFTER_16MB], env={**base, **env}, capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    assert run() == ("True", 0)
    applied, mmapped = run(TRANSFORMER_MALLOC="0")
    assert applied == "False" and mmapped >= 16 << 20  # glibc's default: a fresh mapping
    assert run(MALLOC_ARENA_MAX="2")[0] == "False"


_CACHE_HITS = """
import os, sys, tempfile, torch
if sys.argv[1] == "bf16-training":
    sys.path.insert(0, sys.argv[2])
    from helpers import tiny_run_config
    from transformer.train import Trainer
    Trainer(tiny_run_config(precision="bf16"), os.path.join(tempfile.mkdtemp(), "run"))  # caps it, no product yet
print(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"), flush=True)
linear = torch.nn.Linear(64, 32)
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    for _ in range(2):  # 40 shapes, twice: a cache that holds them all hits on the second pass
        for n in range(3, 43):
            linear(torch.randn(n, 64))
"""


def _onednn_cache(kind: str = "bf16-training", **env) -> tuple[str, int, int]:
    """(the capacity left set, oneDNN's cache hits, misses) for 40 bf16 shapes run twice, after a bf16 Trainer
    is built on the CPU ("bf16-training") or without one."""
    base = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "ONEDNN_VERBOSE")}
    out = subprocess.run(
        [sys.executable, "-c", _CACHE_HITS, kind, os.path.dirname(__file__)],
        env={**base, "ONEDNN_VERBOSE": "profile_create", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return out.split()[0], out.count("create:cache_hit"), out.count("create:cache_miss")


def test_bf16_cpu_training_bounds_onednn_primitive_cache():
    """Token-bucketed bf16 training gives oneDNN a new shape almost every batch; its default cache (1024
    primitives) then grew a run's memory far past fp32's without being reused. The Trainer caps it for bf16 on
    a CPU: 40 shapes run twice all miss again (an LRU cache of 16 holds none of them by the second pass), where
    oneDNN's default capacity, which every other process keeps, hits every one of them."""
    default = _onednn_cache("other")
    if default[2] == 0:
        pytest.skip("oneDNN builds no primitive for a bf16 product on this CPU")
    assert default[0] == "None" and default[1] == default[2] >= 40  # one primitive (or more) per shape
    capacity, hits, misses = _onednn_cache()
    assert (hits, misses) == (0, 2 * default[2])
    assert capacity == str(cpu.memory.ONEDNN_CACHE_CAPACITY)


def test_a_primitive_cache_capacity_the_user_set_is_kept():
    assert _onednn_cache(ONEDNN_PRIMITIVE_CACHE_CAPACITY="7", ONEDNN_VERBOSE="0")[0] == "7"


def test_a_resumed_run_takes_the_cpu_paths_it_was_trained_with():
    from transformer import cpu

    before = cpu.cpu_paths()
    cpu.set_cpu_paths(cpu.CpuPaths(why="test"))
    try:
        trained = cpu.CpuPaths(train=True, why="timed").to_dict()
        line = cpu.reapply_cpu_paths(trained)
        usable = cpu.paths.onednn_usable()
        assert cpu.cpu_paths().train == usable  # on where this machine runs it, else off
        assert (line is not None) == usable
        assert cpu.reapply_cpu_paths(trained) is None  # already so: nothing to say
    finally:
        cpu.set_cpu_paths(before)
