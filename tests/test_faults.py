"""Interruptions and faults: nothing lost, nothing half-written."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import tiny_run_config
from transformer import TransformerError
from transformer.checkpoint import load_checkpoint
from transformer.train import Trainer

CLI = [sys.executable, "-m", "transformer"]  # works whether or not the package is installed


def nan_after(task, bad_steps):
    """Make the task's loss NaN on the given (1-based) optimizer steps."""
    real = task.loss
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        value = real(model, batch)
        return value * float("nan") if calls["n"] in bad_steps else value

    task.loss = loss


def test_single_nan_step_is_skipped(tmp_path, caplog):
    def run(steps, nan_steps):
        trainer = Trainer(
            tiny_run_config(max_steps=steps, eval_every=100, eval_bleu_sentences=5), tmp_path / str(steps)
        )
        nan_after(trainer.task, nan_steps)
        with caplog.at_level("WARNING", logger="transformer"):
            trainer.train()
        return trainer

    before = run(2, set())  # the same run, stopped just before the bad step
    skipped = run(3, {3})
    assert "step 3: non-finite loss" in caplog.text and skipped.position.step == 3
    # the bad step changed nothing: the same parameters and optimizer state as after step 2
    for (name, a), b in zip(before.model.named_parameters(), skipped.model.parameters()):
        assert torch.equal(a, b), name
    steps = [int(s["step"]) for s in skipped.optimizer.state_dict()["state"].values()]
    assert steps and set(steps) == {2}
    # and training goes on after it
    more = run(8, {3})
    assert more.position.step == 8 and all(torch.isfinite(p).all() for p in more.model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(more.model.parameters(), skipped.model.parameters()))


def test_repeated_nan_stops_with_last_good_checkpoint_intact(tmp_path):
    run = tiny_run_config(max_steps=50, eval_every=2, eval_bleu_sentences=5, max_bad_steps=3)
    trainer = Trainer(run, tmp_path / "run")
    nan_after(trainer.task, set(range(3, 100)))
    with pytest.raises(TransformerError, match="3 steps in a row had a non-finite loss"):
        trainer.train()
    ckpt = load_checkpoint(tmp_path / "run" / "last")
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())


def tiny_yaml(tmp_path, steps):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{d_model: 32, n_heads: 2, n_encoder_layers: 1, n_decoder_layers: 1, d_ff: 64, dropout: 0.1,
        tie_embeddings: all}}
data: {{task: synthetic, synthetic_max_len: 6, synthetic_train_size: 2000, synthetic_val_size: 20}}
train: {{max_tokens: 256, max_steps: {steps}, eval_every: 50, eval_bleu_sentences: 5, warmup_steps: 10,
        log_every: 10, precision: fp32}}
""")
    return cfg


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_training_resumes_to_the_same_parameters(tmp_path, sig, code):
    from safetensors.torch import load_file

    steps = 600
    cfg = tiny_yaml(tmp_path, steps)
    proc = subprocess.Popen(
        [*CLI, "train", str(cfg), "--out", str(tmp_path / "cut")], stderr=subprocess.PIPE, text=True
    )
    # Sent only once last/ is whole (it is renamed into place, so its state file means a finished save, first at
    # step 50): the test is about resuming from it, so however slow the machine, no signal goes before then.
    state_file = tmp_path / "cut" / "last" / "training_state.json"
    deadline = time.time() + 600
    while not state_file.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"training ended (exit {proc.returncode}) before last/ was written: {proc.stderr.read()[-2000:]}"
            )
        if time.time() > deadline:
            proc.kill()
            pytest.fail("last/ was not written within 600 s: nothing to resume from, so no signal was sent")
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"resume with --resume {tmp_path / 'cut'}" in err
    state = json.loads((tmp_path / "cut" / "last" / "training_state.json").read_text())
    assert 50 <= state["position"]["step"] < steps  # really stopped in the middle
    done = subprocess.run([*CLI, "train", "--resume", str(tmp_path / "cut"), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    whole = subprocess.run(
        [*CLI, "train", str(cfg), "--out", str(tmp_path / "whole"), "--json"], capture_output=True, text=True
    )
    assert whole.returncode == 0, whole.stderr
    a = load_file(str(tmp_path / "cut" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Saves checkpoint 1 whole, then checkpoint 2 with the process killed (os._exit, as SIGKILL: no clean-up) just
# before its k-th rename or flush to disk, the points where a crash could leave something half done.
WRITER = """
import os, sys, torch
from transformer import ModelConfig, Transformer
from transformer.checkpoint import save_checkpoint
from transformer.tokenizers import CharTokenizer
target, kill_at = sys.argv[1], int(sys.argv[2])
tok = CharTokenizer("abc")
model = Transformer(ModelConfig(src_vocab_size=7, tgt_vocab_size=7, d_model=16, n_heads=2, n_encoder_layers=1,
                                n_decoder_layers=1, d_ff=16))
def save(i):
    with torch.no_grad():
        model.output.weight.fill_(i)
    save_checkpoint(target, model, "translation", {"src": tok, "tgt": tok}, meta={"i": i}, overwrite=True)
save(1)
points = {"n": 0}
def deadly(real):
    def call(*args, **kwargs):
        points["n"] += 1
        if points["n"] == kill_at:
            os._exit(9)
        return real(*args, **kwargs)
    return call
os.replace, os.fsync, os.rename = deadly(os.replace), deadly(os.fsync), deadly(os.rename)
save(2)
print("saved", points["n"], flush=True)
"""


def test_a_kill_at_any_point_of_saving_never_breaks_the_checkpoint(tmp_path):
    k = 0
    while True:
        k += 1
        target = tmp_path / f"kill{k}" / "ckpt"
        proc = subprocess.run(
            [sys.executable, "-c", WRITER, str(target), str(k)], capture_output=True, text=True, timeout=120
        )
        ckpt = load_checkpoint(target)  # always loadable (recovered if need be), and internally consistent
        assert float(ckpt.model.output.weight[0, 0]) == ckpt.meta["i"]
        leftovers = [p.name for p in target.parent.iterdir() if p.name != "ckpt"]
        if proc.returncode == 9:  # killed at point k: the old checkpoint or the new one, whole
            assert ckpt.meta["i"] in (1, 2), ckpt.meta
        else:
            assert proc.returncode == 0 and proc.stdout.startswith("saved"), proc.stderr[-2000:]
            assert ckpt.meta["i"] == 2 and leftovers == []
            break
    assert k > 5  # the save really has that many points, and each was cut


# Where a signal can arrive during training, and how to deliver it there: (name, what to wrap, which call).
# "loss" calls are micro-batches (2 a step: call 5 is the first half of step 3, call 16 the last of step 8);
# validations run at steps 3, 6 and the final one at 8; saves are step, best and last checkpoints.
SIGNAL_POINTS = [
    ("before the first step", "run_config", 1),
    ("between micro-batches", "loss", 5),
    ("during a validation", "validate", 1),
    ("during a save", "save", 2),
    ("at the last step", "loss", 16),
    ("during the final validation", "validate", 3),
    ("during the averaging", "average", 1),
]


def _no_clock(path):
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("minutes", "train_minutes")}
        for line in path.read_text().splitlines()
    ]


@pytest.mark.parametrize("point, where, call", SIGNAL_POINTS, ids=[p[0] for p in SIGNAL_POINTS])
def test_a_signal_at_any_point_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, point, where, call):
    import os

    from transformer import rundir, train
    from transformer.train import TrainingInterrupted

    run = tiny_run_config(
        max_steps=8, eval_every=3, eval_bleu_sentences=5, accumulate=2, max_tokens=256, average_last=2, log_every=2
    )
    whole = Trainer(run, tmp_path / "whole")
    expected = whole.train()
    sig = signal.SIGTERM if call % 2 else signal.SIGINT
    cut = Trainer(run, tmp_path / "cut")
    calls = {"n": 0}

    def deliver(real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == call:
                os.kill(os.getpid(), sig)  # the handler only notes it; the trainer stops at its next safe point
            return real(*args, **kwargs)

        return wrapped

    with monkeypatch.context() as m:
        if where == "loss":
            cut.task.loss = deliver(cut.task.loss)
        elif where == "validate":
            cut.task.validate = deliver(cut.task.validate)
        else:
            module, name = {
                "run_config": (rundir, "write_run_config"),
                "save": (train, "save_checkpoint"),
                "average": (rundir, "average_checkpoints"),
            }[where]
            m.setattr(module, name, deliver(getattr(module, name)))
        with pytest.raises(TrainingInterrupted) as stopped:
            cut.train()
    assert stopped.value.exit_code == 128 + sig
    resumed = Trainer(run, tmp_path / "cut", resume=True).train()
    clockless = [{k: v for k, v in r.items() if k not in ("minutes", "train_minutes")} for r in (resumed, expected)]
    assert clockless[0] == clockless[1]
    for name in ("last", "best", "averaged"):
        a = load_checkpoint(tmp_path / "cut" / name).model.state_dict()
        b = load_checkpoint(tmp_path / "whole" / name).model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), (point, name)
    assert _no_clock(tmp_path / "cut" / "metrics.jsonl") == _no_clock(tmp_path / "whole" / "metrics.jsonl")
