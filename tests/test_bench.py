"""The benchmark suite runs (tiny sizes, two rounds) with equal work for every contender, so it does not rot;
the full suite is `make bench`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import workloads as W  # noqa: E402
from bench.harness import UnequalWork, compare  # noqa: E402


def test_bench_smoke(tmp_path):
    if os.environ.get("CI") and not W.have_hf():
        pytest.fail("CI installs the bench extra (transformers): the peers' code paths must run there")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["meta"]["smoke"] is True
    names = {(r["workload"], r["contender"]) for r in data["rows"]}
    assert ("train small fp32", "nn.Transformer") in names and ("greedy base", "naive recompute") in names
    assert ("train small fp32 Marian defaults", "ours") in names
    if data["meta"]["hf"]:
        assert {("greedy base", "HF generate"), ("beam5 base", "HF generate"), ("lm step", "HF GPT-2"),
                ("lm step", "HF GPT-2 gelu_new"), ("train small fp32 Marian defaults", "HF Marian")} <= names
    for r in data["rows"]:
        if "ratio" in r:
            assert r["ratio"] > 0 and r["ratio_iqr"] >= 0
    assert any("mfu" in r and r["peak_tflops"] > 0 for r in data["rows"])
    assert any("peak_mib" in r for r in data["rows"])


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
