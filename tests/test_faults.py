"""Interruptions and faults: nothing lost, nothing half-written."""

import json
import os
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
        value, n = real(model, batch)
        return (value * float("nan") if calls["n"] in bad_steps else value), n

    task.loss = loss


def test_single_nan_step_is_skipped(tmp_path, caplog):
    trainer = Trainer(tiny_run_config(max_steps=8, eval_every=100, eval_bleu_sentences=5), tmp_path / "run")
    nan_after(trainer.task, {3})
    with caplog.at_level("WARNING", logger="transformer"):
        trainer.train()
    assert "step 3: non-finite loss" in caplog.text
    assert trainer.pos.step == 8
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


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
train: {{max_tokens: 256, max_steps: {steps}, eval_every: 100000, eval_bleu_sentences: 5, warmup_steps: 10,
        log_every: 10}}
""")
    return cfg


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_training_resumes_to_the_same_parameters(tmp_path, sig, code):
    from safetensors.torch import load_file

    steps = 1500  # a few seconds: the signal lands well inside
    cfg = tiny_yaml(tmp_path, steps)
    proc = subprocess.Popen([*CLI, "train", str(cfg), "--out", str(tmp_path / "cut")], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "cut" / "run_config.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # into the loop
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"resume with --resume {tmp_path / 'cut'}" in err
    state = json.loads((tmp_path / "cut" / "last" / "training_state.json").read_text())
    assert 0 < state["position"]["step"] < steps  # really stopped in the middle
    done = subprocess.run([*CLI, "train", "--resume", str(tmp_path / "cut"), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    whole = subprocess.run([*CLI, "train", str(cfg), "--out", str(tmp_path / "whole"), "--json"], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    a = load_file(str(tmp_path / "cut" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


WRITER = """
import sys, torch
from transformer import ModelConfig, Transformer
from transformer.checkpoint import save_checkpoint
from transformer.data import CharTokenizer
tok = CharTokenizer("abc")
model = Transformer(ModelConfig(src_vocab_size=7, tgt_vocab_size=7, d_model=256, n_heads=4, n_encoder_layers=4,
                                n_decoder_layers=4, d_ff=1024))
i = 0
while True:
    i += 1
    with torch.no_grad():
        model.output.weight.fill_(i)
    save_checkpoint(sys.argv[1], model, "translation", {"src": tok, "tgt": tok}, meta={"i": i})
    print(i, flush=True)
"""


def test_sigkill_while_saving_never_breaks_the_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()  # at least one complete save
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(target)  # always loadable, and internally consistent
        assert float(ckpt.model.output.weight[0, 0].detach()) == ckpt.meta["i"]
