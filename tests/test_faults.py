"""Interruptions and faults: nothing lost, nothing half-written."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from transformer import TransformerError
from transformer.checkpoint import load_checkpoint
from transformer.train import Trainer

from helpers import tiny_run_config

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
        trainer = Trainer(tiny_run_config(max_steps=steps, eval_every=100, eval_bleu_sentences=5), tmp_path / str(steps))
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
    proc = subprocess.Popen([*CLI, "train", str(cfg), "--out", str(tmp_path / "cut")], stderr=subprocess.PIPE, text=True)
    # last/ is first written at step 50, inside the training loop: the signal handlers are in place by then
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "last").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"resume with --resume {tmp_path / 'cut'}" in err
    state = json.loads((tmp_path / "cut" / "last" / "training_state.json").read_text())
    assert 50 <= state["position"]["step"] < steps  # really stopped in the middle
    done = subprocess.run([*CLI, "train", "--resume", str(tmp_path / "cut"), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    whole = subprocess.run([*CLI, "train", str(cfg), "--out", str(tmp_path / "whole"), "--json"], capture_output=True, text=True)
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
from transformer.data import CharTokenizer
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
        proc = subprocess.run([sys.executable, "-c", WRITER, str(target), str(k)], capture_output=True, text=True,
                              timeout=120)
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
