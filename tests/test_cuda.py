"""On a CUDA GPU: training, decoding that gives the CPU's tokens, exact resume, the demo and bf16 decoding.

Marked `cuda`: skipped, with the reason, where no GPU is visible (`pytest -m cuda` runs only these).
"""

import json
import subprocess
import sys

import pytest
import torch

from helpers import REVERSE_WORDS as WORDS
from helpers import tiny_model, tiny_run_config
from transformer.batching import pad_batch
from transformer.checkpoint import load_checkpoint
from transformer.generate import beam_search, greedy, sample, translate_texts
from transformer.train import Trainer

pytestmark = pytest.mark.cuda

# strings of different lengths: sentences finish at different steps, so the active batch shrinks mid-decoding


def test_a_few_training_steps_on_the_gpu(tmp_path):
    run = tiny_run_config(max_steps=60, eval_every=30, eval_bleu_sentences=20, device="cuda")
    trainer = Trainer(run, tmp_path / "run")
    trainer.train()
    assert trainer.device.type == "cuda" and all(p.is_cuda for p in trainer.model.parameters())
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [30, 60] and lines[1]["val_loss"] < lines[0]["val_loss"]
    ckpt = load_checkpoint(tmp_path / "run" / "best")  # a GPU-trained checkpoint loads on the CPU
    assert next(ckpt.model.parameters()).device.type == "cpu"


def test_decoding_on_the_gpu_gives_the_cpu_tokens(reverse_checkpoint):
    cpu = load_checkpoint(reverse_checkpoint)
    gpu = load_checkpoint(reverse_checkpoint, device="cuda")
    src = pad_batch([cpu.src_tokenizer.encode(w) for w in WORDS])
    assert greedy(gpu.model, src.cuda()) == greedy(cpu.model, src)
    assert beam_search(gpu.model, src.cuda(), beam_size=4) == beam_search(cpu.model, src, beam_size=4)
    out = translate_texts(gpu.model, gpu.src_tokenizer, gpu.tgt_tokenizer, WORDS, batch_size=3)
    assert out == [w[::-1] for w in WORDS]


def test_sampling_on_the_gpu_gives_the_cpu_tokens():
    model = tiny_model("decoder-only", vocab=40, d_model=32, n_decoder_layers=2, d_ff=64, tie_embeddings="decoder")
    prompt = torch.tensor([[1, 5, 6], [7, 8, 9]])

    def tokens(m, p):  # random numbers are drawn on the CPU whatever the device: the same seed, the same text
        gen = torch.Generator().manual_seed(11)
        return torch.stack(list(sample(m, p, 40, temperature=1.0, top_p=0.9, generator=gen))).cpu()

    on_cpu = tokens(model, prompt)
    on_gpu = tokens(model.cuda(), prompt.cuda())
    assert torch.equal(on_cpu, on_gpu)


def test_resume_is_exact_on_the_gpu_with_dropout(tmp_path):
    def run_config(steps):
        run = tiny_run_config(max_steps=steps, eval_every=1000, eval_bleu_sentences=10, max_tokens=256, device="cuda")
        run.model.dropout = 0.1  # dropout draws from the GPU's random state: resume must restore it
        return run

    whole = Trainer(run_config(30), tmp_path / "whole")
    whole.train()
    Trainer(run_config(12), tmp_path / "split").train()
    resumed = Trainer(run_config(30), tmp_path / "split", resume=True)
    resumed.train()
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_on_the_gpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "transformer", "demo", "--device", "cuda", "--json", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["exact_match"] >= 0.99, result


def test_bf16_decoding_on_the_gpu(tmp_path, reverse_checkpoint):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS) + "\n")
    outs = []
    for extra in ([], ["--bf16"]):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "transformer",
                "translate",
                str(reverse_checkpoint),
                "--input",
                str(words),
                "--device",
                "cuda",
                "--beam",
                "3",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout.splitlines())
    assert sum(a == w[::-1] for a, w in zip(outs[0], WORDS)) >= len(WORDS) - 1  # as on the CPU (test_generate)
    # bf16 rounds the activations: the model's clear choices survive it
    assert sum(a == b for a, b in zip(*outs)) >= len(WORDS) - 1
