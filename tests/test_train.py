import json

import pytest
import torch

from transformer.checkpoint import load_checkpoint
from transformer.config import TrainConfig
from transformer.train import Trainer, average_checkpoints, learning_rate

from helpers import tiny_run_config


def test_learning_rate_schedules():
    t = TrainConfig(lr=1e-3, warmup_steps=100, schedule="inverse_sqrt")
    assert learning_rate(t, 50) == pytest.approx(5e-4)
    assert learning_rate(t, 100) == pytest.approx(1e-3)
    assert learning_rate(t, 400) == pytest.approx(5e-4)
    c = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine", max_steps=110)
    assert learning_rate(c, 10) == pytest.approx(1e-3)
    assert learning_rate(c, 60) == pytest.approx(5.5e-4)
    assert learning_rate(c, 110) == pytest.approx(1e-4)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_gives_the_same_parameters(tmp_path):
    def run_config(steps):
        run = tiny_run_config(max_steps=steps, eval_every=1000, eval_bleu_sentences=10, max_tokens=256, accumulate=2)
        run.model.dropout = 0.1  # exercise the RNG state too
        return run

    whole = Trainer(run_config(30), tmp_path / "whole")
    whole.train()
    first = Trainer(run_config(12), tmp_path / "split")
    first.train()
    resumed = Trainer(run_config(30), tmp_path / "split", resume=True)
    assert resumed.pos.step == 12
    resumed.train()
    a, b = params(whole.model), params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the split really differs from a fresh 18-step run: the resumed state mattered
    fresh = Trainer(run_config(18), tmp_path / "fresh")
    fresh.train()
    assert not all(torch.equal(a[k], v) for k, v in params(fresh.model).items())


def test_run_directory_contents(reverse_run):
    out, record = reverse_run
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == record["step"] and "val_loss" in lines[-1] and "exact_match" in lines[-1]
    # the fixture stops at its target (train.stop_at) at the first validation that reaches it
    assert lines[-1]["exact_match"] == 1.0 and all(l["exact_match"] < 1.0 for l in lines[:-1])
    assert [l["step"] for l in lines] == list(range(100, record["step"] + 1, 100))
    assert (out / "last" / "training_state.json").is_file()
    assert not (out / "best" / "training_state.json").exists()
    assert json.loads((out / "run_config.json").read_text())["train"]["max_steps"] == 3000


def test_average_checkpoints(tmp_path, reverse_run):
    out, _ = reverse_run
    a = load_checkpoint(out / "best")
    avg_dir = average_checkpoints([out / "best", out / "last"], tmp_path / "avg")
    avg = load_checkpoint(avg_dir)
    b = load_checkpoint(out / "last")
    for k, v in avg.model.state_dict().items():
        torch.testing.assert_close(v, (a.model.state_dict()[k] + b.model.state_dict()[k]) / 2)


def test_same_seed_gives_identical_metrics(tmp_path):
    """Two runs of one recipe write the same metrics.jsonl, but for the wall-clock minutes."""

    def metrics(name):
        run = tiny_run_config(max_steps=20, eval_every=10, eval_bleu_sentences=20, max_tokens=256)
        run.model.dropout = 0.1
        Trainer(run, tmp_path / name).train()
        lines = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for line in lines:
            line.pop("minutes")
        return lines

    first, second = metrics("a"), metrics("b")
    assert len(first) == 2 and first == second


def test_training_ends_with_an_averaged_checkpoint(tmp_path):
    run = tiny_run_config(max_steps=12, eval_every=4, eval_bleu_sentences=5, average_last=2)
    Trainer(run, tmp_path / "run").train()
    avg = load_checkpoint(tmp_path / "run" / "averaged")
    a = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000008")
    b = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000012")
    for k, v in avg.model.state_dict().items():
        torch.testing.assert_close(v, (a.model.state_dict()[k] + b.model.state_dict()[k]) / 2)
