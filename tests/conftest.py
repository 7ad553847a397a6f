import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the peers must never reach for a hub: everything is on local disk
# prepared corpora go to a directory of this test session's, not the user's cache, removed when the session ends
if "TRANSFORMER_CACHE" not in os.environ:
    os.environ["TRANSFORMER_CACHE"] = tempfile.mkdtemp(prefix="transformer-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TRANSFORMER_CACHE"], ignore_errors=True)


def _fix_cpu_paths() -> None:
    """Every process of the test session (the CLI and torchrun ones too) takes the same CPU paths, read from
    the per-machine decision file: a timed choice could flip with the load on a shared machine, and the
    trained fixtures, hence the tests' expectations, with it. Every oneDNN path that works here is taken, so
    the suite exercises them; tests that need another choice set it themselves."""
    import torch as _torch

    from transformer import cpu

    fp32, bf16 = cpu.paths.onednn_usable(_torch.float32), cpu.paths.onednn_usable(_torch.bfloat16)
    fixed = cpu.CpuPaths(fp32, fp32, bf16, why="fixed for the test session: every path that works here")
    cpu.decisions.record("paths", "oneDNN", fixed.to_dict())


_fix_cpu_paths()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where a GPU is visible, and say so where none is."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data; tests that need it skip with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the project in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def reverse_run(tmp_path_factory):
    """A run directory of a small model trained to reverse strings of up to 8 letters (shared by tests)."""
    from helpers import tiny_run_config
    from transformer.train import Trainer

    out = tmp_path_factory.mktemp("reverse-run")
    # Trained until it is good enough, not for a step count that happened to suffice on one machine: every
    # validation string reversed exactly, checked every 100 steps, with a generous cap.
    run = tiny_run_config(schedule="inverse_sqrt", max_steps=3000, eval_every=100, stop_at=1.0)
    record = Trainer(run, out).train()
    assert record["exact_match"] == 1.0, f"the shared fixture did not learn the task in 3000 steps: {record}"
    return out, record


@pytest.fixture(scope="session")
def reverse_checkpoint(reverse_run):
    return reverse_run[0] / "best"
