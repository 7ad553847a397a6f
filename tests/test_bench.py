"""The benchmark suite runs (tiny sizes, two rounds) with equal work for every contender, so it does not rot;
the full suite is `make bench`."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ct2_worker  # noqa: E402
from bench import workloads as W  # noqa: E402
from bench.harness import AGREE, BUSY, SPREAD, Quiet, UnequalWork, compare, unreliable  # noqa: E402


def test_bench_smoke(tmp_path):
    if os.environ.get("CI") and not W.have_hf():
        pytest.fail("CI installs the bench extra (transformers): the peers' code paths must run there")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["meta"]["smoke"] is True
    names = {(r["workload"], r["contender"]) for r in data["rows"]}
    assert ("train small fp32", "nn.Transformer") in names and ("greedy base", "naive recompute") in names
    assert ("train small fp32 Marian defaults", "ours") in names
    if data["meta"]["hf"]:
        assert {
            ("greedy base", "HF generate"),
            ("beam5 base", "HF generate"),
            ("lm step", "HF GPT-2"),
            ("lm step", "HF GPT-2 gelu_new"),
            ("train small fp32 Marian defaults", "HF Marian"),
            ("llama prefill fp32 b1", "HF generate"),
            ("llama decode fp32 b8", "HF generate"),
        } <= names
    for r in data["rows"]:
        if "ratio" in r:
            assert r["ratio"] > 0 and r["ratio_iqr"] >= 0 and "unreliable" not in r
        if "unreliable" in r:  # a flagged row shows why and what it measured, and judges no target
            assert r["unreliable"] and r["ratio_as_measured"] > 0 and "ratio" not in r and "met" not in r
    assert data["meta"]["ours"]["threads"] == data["meta"]["threads"] and data["meta"]["ours"]["isa"]
    assert data["meta"]["unreliable_if"] == {
        "alone_vs_interleaved_over": AGREE,
        "ratio_iqr_over_fraction": SPREAD,
        "others_cores_over": BUSY,
    }
    if W.have_ct2():  # each CTranslate2 row names its threads, ISA, compute type and GEMM backend
        ct2 = [r for r in data["rows"] if r["workload"].startswith("ct2 ")]
        assert len(ct2) == 16 and all("alone_s" in r and "spin_after_s" in r and r["threads"] for r in ct2)
        assert {r["compute_type"] for r in ct2 if r["contender"] == "CTranslate2"} <= {"float32", "int8_float32"}
        assert all(
            info["sgemm"] and info["env"]["CT2_USE_MKL"] in ("0", "1") for info in data["meta"]["ctranslate2"].values()
        )
    assert any("mfu" in r and r["peak_tflops"] > 0 for r in data["rows"])
    assert any("peak_mib" in r for r in data["rows"])


def test_serve_abuse_runs_and_the_server_holds(reverse_checkpoint, tmp_path):
    """bench.serve_abuse in a few seconds: both phases run, every well-formed request is answered 200 beside
    the abusive clients, none of which gets a 5xx, and the over-the-limit ones are refused (413)."""
    pytest.importorskip("fastapi", reason="serving needs the serve extra: pip install 'transformer[serve]'")
    pytest.importorskip("httpx", reason="the bench's HTTP client: pip install httpx")
    words, out = tmp_path / "words.txt", tmp_path / "abuse.json"
    words.write_text("\n".join(["abc", "hello", "world", "reverse", "tiny", "words"]) + "\n")
    cmd = [sys.executable, "-m", "bench.serve_abuse", str(reverse_checkpoint), "--src", str(words)]
    flags = ["--seconds", "2", "--clients", "2", "--warmup", "0.5", "--json", str(out)]
    proc = subprocess.run([*cmd, *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for name in ("baseline", "abuse"):
        phase = data[name]
        assert phase["well_formed_requests"] > 0 and phase["statuses"]["well-formed"] == {
            "200": phase["well_formed_requests"]
        }
        assert phase["5xx"] == 0
    assert set(data["abuse"]["statuses"]["attention, too long"]) == {"413"}


@pytest.mark.parametrize("beam", [1, 5])
def test_decoding_contenders_write_the_same_tokens(beam):
    """Every decoding contender writes exactly batch x new_tokens tokens: </s> is suppressed the same way for
    all (its count is what the harness checks in every round)."""
    contenders = W.decode_contenders(W.TINY, 6, 3, beam, W.have_hf(), naive=beam == 1)
    counts = {name: fn() for name, fn in contenders.items()}
    assert set(counts.values()) == {3 * 6}, counts


def test_unequal_work_fails_the_run():
    with pytest.raises(UnequalWork, match="different work"):
        compare({"a": lambda: 5, "b": lambda: 6}, rounds=1, warmup=0)
    assert compare({"a": lambda: 5, "b": lambda: 5}, rounds=2, warmup=0)["b"]["work"] == [5, 5]


def test_suppressed_eos_is_never_written():
    torch.manual_seed(0)
    model = W.ours(W.TINY).eval()
    W.suppress_eos(model.output)
    src = torch.randint(4, W.TINY.vocab, (4, 5))
    from transformer.generate import greedy

    assert all(len(o) == 9 for o in greedy(model, src, max_len_a=0, max_len_b=9))


def _result(ours_s, peer_s, ours_alone=None, peer_alone=None, others=0.0):
    """A compare() result for two contenders from per-round times."""
    out = {}
    for name, times, alone in (("ours", ours_s, ours_alone), ("peer", peer_s, peer_alone)):
        out[name] = {
            "median_s": sorted(times)[len(times) // 2],
            "times_s": times,
            "work": [1] * len(times),
            "others_cores": others,
        }
        if alone is not None:
            out[name]["alone_s"] = [alone]
    return out


def test_a_steady_race_is_not_flagged():
    res = _result([1.0, 1.01, 0.99, 1.0, 1.02], [2.0, 2.02, 1.98, 2.0, 2.01], ours_alone=1.05, peer_alone=1.9)
    assert unreliable(res, "ours", "peer") is None


def test_alone_and_interleaved_apart_is_flagged():
    # the peer reads 2 s interleaved but 0.29 s alone: something ran beside it in the rounds
    res = _result([0.2] * 5, [2.0] * 5, ours_alone=0.2, peer_alone=0.29)
    why = unreliable(res, "ours", "peer")
    assert why and "peer alone 0.29 s vs 2 s interleaved" in why and "ours" not in why
    # within the factor: not flagged
    assert unreliable(_result([0.2] * 5, [2.0] * 5, 0.2, 2.0 * AGREE * 0.99), "ours", "peer") is None


def test_wide_spread_and_a_busy_machine_are_flagged():
    wide = _result([1.0] * 5, [1.0, 3.0, 1.2, 2.5, 1.1])
    assert "IQR" in unreliable(wide, "ours", "peer")
    busy = _result([1.0] * 5, [2.0] * 5, others=BUSY + 0.1)
    assert "other processes took" in unreliable(busy, "ours", "peer")
    too_short = _result([1.0] * 5, [2.0] * 5, others=None)  # too little time to tell: no judgement either way
    assert unreliable(too_short, "ours", "peer") is None


def test_compare_records_alone_and_settle():
    res = compare({"a": lambda: 5, "b": lambda: 5}, rounds=3, warmup=1, settle=Quiet([os.getpid()]), alone=2)
    for r in res.values():
        assert len(r["times_s"]) == 3 and len(r["alone_s"]) == 2 and len(r["settle_s"]) == 3
        assert r["unsettled"] == 0 and r["others_cores"] is None  # far too short to measure other processes


def test_quiet_waits_while_a_thread_burns_cpu():
    """A thread that keeps a core busy (as a spin-waiting OpenMP team does) holds Quiet until it stops."""
    stop = time.perf_counter() + 0.15

    def spin() -> None:
        while time.perf_counter() < stop:
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    waited = Quiet([os.getpid()], timeout=5)()
    spinner.join()
    assert waited >= 0.1
    assert Quiet([os.getpid()], timeout=5)() < 0.1  # and idle threads are let through at once


def test_ct2_report_is_parsed():
    log = """[info] CPU: AuthenticAMD (SSE4.1=true, AVX=true, AVX2=true, AVX512=true)
[info]  - Selected ISA: AVX2
[info]  - Use Intel MKL: false
[info]  - SGEMM backend: DNNL (packed: false)
[info]  - GEMM_S16 backend: none (packed: false)
[info]  - GEMM_S8 backend: DNNL (packed: false, u8s8 preferred: true)
[info]  - Selected compute type: int8_float32"""
    assert ct2_worker.parse_report(log) == {
        "cpu": "AuthenticAMD (SSE4.1=true, AVX=true, AVX2=true, AVX512=true)",
        "isa": "AVX2",
        "mkl": "false",
        "sgemm": "DNNL (packed: false)",
        "gemm_s8": "DNNL (packed: false, u8s8 preferred: true)",
        "compute_type": "int8_float32",
    }


def test_ct2_backend_is_pinned(monkeypatch):
    monkeypatch.delenv("CT2_USE_MKL", raising=False)
    monkeypatch.setattr(W, "cpu_vendor", lambda: "GenuineIntel")
    assert W.ct2_env()["CT2_USE_MKL"] == "1"  # CTranslate2's own choice there, named
    monkeypatch.setattr(W, "cpu_vendor", lambda: "AuthenticAMD")
    assert W.ct2_env()["CT2_USE_MKL"] == "0"
    monkeypatch.setenv("CT2_USE_MKL", "1")  # the caller's setting wins
    monkeypatch.setenv("CT2_FORCE_CPU_ISA", "AVX512")
    assert W.ct2_env() == {"CT2_USE_MKL": "1", "CT2_FORCE_CPU_ISA": "AVX512"}
