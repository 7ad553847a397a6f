"""The benchmark suite runs (tiny sizes, one round), so it does not rot; the full suite is `make bench`."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["meta"]["smoke"] is True
    names = {(r["workload"], r["contender"]) for r in data["rows"]}
    assert ("train small fp32", "nn.Transformer") in names and ("greedy base", "naive recompute") in names
    assert ("train base bf16", "ours fp32") in names
    assert all(r.get("ratio", 1) > 0 for r in data["rows"])
    assert any("mfu" in r for r in data["rows"]) and any("peak_mib" in r for r in data["rows"])
