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
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            "-m",
            "transformer",
            "train",
            str(cfg),
            "--out",
            str(out),
            *extra,
        ]
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
    assert sorted(p.name for p in (tmp / "ddp").iterdir()) == [
        "best",
        "checkpoints",
        "last",
        "metrics.jsonl",
        "run_config.json",
    ]


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
    train(
        tmp,
        tmp / "c",
        2,
        1,
        "--resume",
        str(tmp / "c"),
        "--fsdp",
        "--set",
        "train.accumulate=1",
        "--set",
        "train.max_steps=6",
    )
    assert_same(weights(tmp / "c"), weights(tmp / "single"))


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.replace("ACC", "1"))
    proc = subprocess.run(
        [*CLI, "train", str(cfg), "--out", str(tmp_path / "r"), "--fsdp"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "launch with torchrun" in proc.stderr and "Traceback" not in proc.stderr


# -- a signal under torchrun ----------------------------------------------------------------------------------

SIGNAL_CONFIG = """
model: {d_model: 32, n_heads: 2, n_encoder_layers: 1, n_decoder_layers: 1, d_ff: 64, dropout: 0.1,
        tie_embeddings: all}
data: {task: synthetic, synthetic_max_len: 6, synthetic_train_size: 2000, synthetic_val_size: 20}
train: {max_tokens: 128, max_steps: 8, eval_every: 3, eval_bleu_sentences: 5, warmup_steps: 2, log_every: 2,
        accumulate: 2, average_last: 2, precision: fp32}
"""

# Runs the CLI in a torchrun worker; on rank 0, at the given call of `where`, sends the signal to torchrun (the
# worker's parent), which passes it on to every worker as it does a scheduler's or a Ctrl-C's, and waits until
# rank 0's handler has it, so that the point of delivery is the one named (rank 1 gets it about then: the
# trainer's vote at each safe point stops both at the same one).
SIGNAL_LAUNCHER = """
import os, signal, sys, time
from transformer import cli, tasks, train
where, call, name = os.environ["SIGNAL_AT"].split(":")
handlers = []
class Noted(train.StopSignals):
    def __enter__(self):
        handlers.append(self)
        return super().__enter__()
train.StopSignals = Noted
calls = [0]
def deliver(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(call):
            os.kill(os.getppid(), getattr(signal, name))
            deadline = time.time() + 60
            while handlers[-1].signum is None and time.time() < deadline:
                time.sleep(0.01)
        return real(*args, **kwargs)
    return wrapped
if os.environ.get("RANK") == "0":
    owner = train if where == "save_checkpoint" else tasks.TranslationTask
    setattr(owner, where, deliver(getattr(owner, where)))
sys.exit(cli.main(sys.argv[1:]))
"""


def _torchrun(script, *args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def whole_two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signals")
    (tmp / "run.yaml").write_text(SIGNAL_CONFIG)
    (tmp / "launch.py").write_text(SIGNAL_LAUNCHER)
    proc = _torchrun("-m", "transformer", "train", str(tmp / "run.yaml"), "--out", str(tmp / "whole"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


# (point, what rank 0 wraps, which call, the signal): 2 micro-batches a step, so loss call 5 is the first half of
# step 3; saves are the step, best and last checkpoints; validations run at steps 3, 6 and the final one at 8.
# The last figure is the step both workers stop at.
TORCHRUN_POINTS = [
    ("between micro-batches", "loss", 5, "SIGINT", 3),
    ("during a save", "save_checkpoint", 2, "SIGTERM", 3),
    ("during the final validation", "validate", 3, "SIGTERM", 8),
]


@pytest.mark.parametrize("point, where, call, name, step", TORCHRUN_POINTS, ids=[p[0] for p in TORCHRUN_POINTS])
def test_a_signal_under_torchrun_resumes_to_the_uninterrupted_run(
    whole_two_process_run, point, where, call, name, step
):
    import os

    from transformer.checkpoint import load_checkpoint

    tmp = whole_two_process_run
    cut = tmp / where
    env = {**os.environ, "SIGNAL_AT": f"{where}:{call}:{name}"}
    stopped = _torchrun(tmp / "launch.py", "train", str(tmp / "run.yaml"), "--out", str(cut), env=env)
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    assert (cut / "last" / "training_state.json").exists()
    said = [line for line in stopped.stderr.splitlines() if "training stopped at" in line]
    assert said == [f"transformer: {name}: training stopped at step {step}; resume with --resume {cut}"] * 2, said
    resumed = _torchrun("-m", "transformer", "train", "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("last", "best", "averaged"):  # the same processes and sums: equal to the bit
        a = load_checkpoint(cut / name).model.state_dict()
        b = load_checkpoint(tmp / "whole" / name).model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), (point, name)
    clockless = [
        [{k: v for k, v in m.items() if k not in ("minutes", "train_minutes")} for m in metrics(run)]
        for run in (cut, tmp / "whole")
    ]
    assert clockless[0] == clockless[1]
