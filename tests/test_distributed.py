"""Data-parallel training with torchrun (gloo on the CPU): 2 processes equal 1 process with the same global
batch, resume across process counts, and only rank 0 writes."""

import json
import subprocess
import sys

import pytest
import torch

CLI = [sys.executable, "-m", "transformer"]  # works whether or not the package is installed

CONFIG = """
model: {d_model: 32, n_heads: 2, n_encoder_layers: 1, n_decoder_layers: 1, d_ff: 64, dropout: 0.0,
        tie_embeddings: all}
data: {task: synthetic, synthetic_max_len: 6, synthetic_train_size: 2000, synthetic_val_size: 20}
train: {max_tokens: 128, max_steps: 6, eval_every: 1, eval_bleu_sentences: 5, warmup_steps: 2, log_every: 1,
        accumulate: ACC, eps: 1.0e-6, precision: fp32}
"""
# Adam's eps is raised from 1e-9: the key projection's bias has an exactly-zero true gradient (softmax ignores a
# constant added to every score), so its gradient is pure rounding noise, which eps=1e-9 would turn into
# lr-sized steps that differ with the order of floating-point sums between one and two processes.


def train(tmp_path, out, procs, acc, *extra):
    cfg = tmp_path / f"acc{acc}.yaml"
    cfg.write_text(CONFIG.replace("ACC", str(acc)))
    if procs == 1:
        cmd = [*CLI, "train", str(cfg), "--out", str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               "-m", "transformer", "train", str(cfg), "--out", str(out), *extra]
    if "--resume" in extra:
        cmd.remove(str(cfg))
        i = cmd.index("--out")
        del cmd[i : i + 2]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "last" / "model.safetensors"))


LR = 7e-4  # TrainConfig's default peak learning rate


def assert_same(a, b):
    # One Adam step moves a parameter by at most about lr. The runs differ only in the order of floating-point
    # sums, which can flip the few coordinates whose gradient is mostly rounding noise: allow 5% of lr per step.
    # (A wrong gradient, say summed instead of averaged over processes, shows in the per-step figures below.)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0.05 * LR * 6, rtol=0)


def metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_steps(a, b):
    """Every step's training loss, gradient norm (before clipping) and validation loss agree: the processes'
    gradients are averaged, weighted by tokens, exactly as one process accumulating them would."""
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(ma, mb):
        for key in ("train_loss", "grad_norm", "val_loss"):
            assert x[key] == pytest.approx(y[key], rel=2e-4, abs=2e-4), (key, x, y)  # 4 decimals in metrics.jsonl


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    train(tmp, tmp / "single", 1, 2)  # one process, two micro-batches per step
    proc = train(tmp, tmp / "ddp", 2, 1)  # two processes, one micro-batch each
    return tmp, proc


def test_two_processes_equal_one_with_the_same_global_batch(runs):
    tmp, _ = runs
    assert_same_steps(tmp / "single", tmp / "ddp")
    assert_same(weights(tmp / "single"), weights(tmp / "ddp"))


def test_only_rank_zero_writes(runs):
    tmp, proc = runs
    lines = (tmp / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5, 6]  # one line per validation, not per process
    assert proc.stdout.count("done:") == 1
    assert sorted(p.name for p in (tmp / "ddp").iterdir()) == ["best", "checkpoints", "last", "metrics.jsonl", "run_config.json"]


def test_resume_across_process_counts(runs):
    tmp, _ = runs
    # 2 processes for 3 steps, resumed by 1 process (with accumulate 2: the same global batch) to step 6
    train(tmp, tmp / "a", 2, 1, "--set", "train.max_steps=3")
    train(tmp, tmp / "a", 1, 1, "--resume", str(tmp / "a"), "--set", "train.accumulate=2", "--set", "train.max_steps=6")
    assert_same(weights(tmp / "a"), weights(tmp / "single"))
    # and a 1-process checkpoint resumed by 2 processes
    train(tmp, tmp / "b", 1, 2, "--set", "train.max_steps=3")
    train(tmp, tmp / "b", 2, 1, "--resume", str(tmp / "b"), "--set", "train.accumulate=1", "--set", "train.max_steps=6")
    assert_same(weights(tmp / "b"), weights(tmp / "single"))


def test_fsdp_equals_one_process_and_resumes_from_it(runs):
    tmp, _ = runs
    train(tmp, tmp / "fsdp", 2, 1, "--fsdp")
    assert_same_steps(tmp / "fsdp", tmp / "single")
    assert_same(weights(tmp / "fsdp"), weights(tmp / "single"))
    # a single-process checkpoint continues under FSDP (the optimizer state is keyed by parameter name)
    train(tmp, tmp / "c", 1, 2, "--set", "train.max_steps=3")
    train(tmp, tmp / "c", 2, 1, "--resume", str(tmp / "c"), "--fsdp", "--set", "train.accumulate=1", "--set", "train.max_steps=6")
    assert_same(weights(tmp / "c"), weights(tmp / "single"))


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.replace("ACC", "1"))
    proc = subprocess.run([*CLI, "train", str(cfg), "--out", str(tmp_path / "r"), "--fsdp"], capture_output=True, text=True)
    assert proc.returncode == 2 and "launch with torchrun" in proc.stderr and "Traceback" not in proc.stderr
