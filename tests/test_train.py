import json

import pytest
import torch

from helpers import tiny_model, tiny_run_config
from transformer.checkpoint import average_checkpoints, load_checkpoint
from transformer.config import TrainConfig
from transformer.train import Trainer, learning_rate


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
    assert resumed.position.step == 12
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
    """Two runs of one recipe write the same metrics.jsonl, but for the two wall-clock minute fields."""

    def metrics(name):
        run = tiny_run_config(max_steps=20, eval_every=10, eval_bleu_sentences=20, max_tokens=256)
        run.model.dropout = 0.1
        Trainer(run, tmp_path / name).train()
        lines = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for line in lines:
            line.pop("minutes"), line.pop("train_minutes")
        return lines

    first, second = metrics("a"), metrics("b")
    assert len(first) == 2 and first == second


def test_training_ends_with_an_averaged_checkpoint(tmp_path):
    # checkpoints at steps 3, 6, 9, 12; the last three asked for, but step 6 is before the last quarter (< 9)
    run = tiny_run_config(max_steps=12, eval_every=3, eval_bleu_sentences=5, average_last=3)
    Trainer(run, tmp_path / "run").train()
    avg = load_checkpoint(tmp_path / "run" / "averaged")
    assert avg.meta["averaged_from"] == [str(tmp_path / "run" / "checkpoints" / f"step-{n:07d}") for n in (9, 12)]
    a = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000009")
    b = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000012")
    for k, v in avg.model.state_dict().items():
        torch.testing.assert_close(v, (a.model.state_dict()[k] + b.model.state_dict()[k]) / 2)


def test_max_epochs_stops_at_the_end_of_the_epoch(tmp_path):
    """Bug: the epoch check came before the batch iterator rolled over, so one epoch trained one step too many."""
    run = tiny_run_config(
        schedule="constant", max_steps=0, max_epochs=1, eval_every=1000, eval_bleu_sentences=5, max_tokens=4096
    )
    trainer = Trainer(run, tmp_path / "run")
    batches = trainer.task.num_batches(0)
    trainer.train()
    assert trainer.position.step == batches and trainer.position.epoch == 0
    # with two micro-batches a step, the last step of an epoch may cross into the next one, and then it stops
    run2 = tiny_run_config(
        schedule="constant",
        max_steps=0,
        max_epochs=1,
        eval_every=1000,
        eval_bleu_sentences=5,
        max_tokens=4096,
        accumulate=2,
    )
    trainer2 = Trainer(run2, tmp_path / "run2")
    trainer2.train()
    assert trainer2.position.step == (batches + 1) // 2


def test_a_pad_id_other_than_zero_is_never_a_target(tmp_path):
    """Bug: padding, target-token counting and decoding hard-coded id 0, so with model.pad_id 3 padding was
    trained as a target and the real token 0 was masked."""
    import torch.nn.functional as F

    from transformer.batching import collate

    model = tiny_model(vocab=20, dropout=0.0, pad_id=3)
    pairs = [([5, 0, 7], [0, 9]), ([6], [8, 0, 10, 11])]
    b = collate(pairs, pad_id=3)
    with torch.no_grad():
        loss = model.loss(b.src, b.tgt_in, b.tgt_out)
        # each sentence alone, unpadded: every one of its target tokens counts, token 0 included
        total = sum(
            F.cross_entropy(
                model(b.src[i : i + 1, : len(s)], b.tgt_in[i : i + 1, : len(t) + 1])[0],
                b.tgt_out[i, : len(t) + 1],
                reduction="sum",
            )
            for i, (s, t) in enumerate(pairs)
        )
    assert b.n_tokens == 8  # 2 + 4 target tokens, each sentence's </s>
    torch.testing.assert_close(loss, total / b.n_tokens)


def test_bf16_training_learns_like_fp32(tmp_path):
    """precision bf16 (autocast) trains: the loss falls, and a step's loss is fp32's within bf16 rounding."""

    def run(precision):
        trainer = Trainer(
            tiny_run_config(max_steps=60, eval_every=30, eval_bleu_sentences=10, precision=precision),
            tmp_path / precision,
        )
        record = trainer.train()
        lines = [json.loads(l) for l in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
        return trainer, record, lines

    bf16, record, lines = run("bf16")
    assert bf16.precision.bf16
    assert lines[1]["val_loss"] < lines[0]["val_loss"] < 3.0  # a 30-token vocabulary starts at ln 30 = 3.4
    _, _, fp32_lines = run("fp32")
    # the first 30 steps' mean training loss: bf16 keeps ~3 significant digits per product
    assert lines[0]["train_loss"] == pytest.approx(fp32_lines[0]["train_loss"], rel=0.03)


def test_max_minutes_ends_training_on_time(tmp_path):
    run = tiny_run_config(schedule="constant", max_steps=0, max_minutes=0.02, eval_every=10_000, eval_bleu_sentences=5)
    trainer = Trainer(run, tmp_path / "run")
    record = trainer.train()
    assert trainer.position.step >= 1 and record["step"] == trainer.position.step
    assert record["minutes"] >= 0.02  # stopped by the budget (1.2 s), and then validated once


def test_stop_when_ends_training_at_the_step_it_names(tmp_path):
    """A caller's own limit (the fine-tuning bench stops on pure training time) ends the run like the recipe's
    limits do: at the first step it holds, with `last/` saved there."""
    seen = []

    def stop(position):
        seen.append(position.step)
        return position.step >= 7

    trainer = Trainer(
        tiny_run_config(max_steps=50, eval_every=1000, eval_bleu_sentences=10), tmp_path / "run", stop_when=stop
    )
    trainer.train()
    assert trainer.position.step == 7 and seen[-1] == 7
    assert json.loads((tmp_path / "run" / "last" / "training_state.json").read_text())["position"]["step"] == 7
