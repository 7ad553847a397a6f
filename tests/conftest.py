import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data; tests that need it skip with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the project in CI)")
    return SHARED_DATA


def tiny_run_config(**train_kw):
    """A small built-in-task recipe that trains in seconds."""
    from transformer import DataConfig, ModelConfig, RunConfig, TrainConfig

    train = dict(max_tokens=1024, lr=3e-3, warmup_steps=50, schedule="cosine", max_steps=400, eval_every=400,
                 label_smoothing=0.0, eval_bleu_sentences=100, log_every=50)
    train.update(train_kw)
    return RunConfig(
        model=ModelConfig(d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=128, dropout=0.0,
                          tie_embeddings="all"),
        data=DataConfig(task="synthetic", synthetic_task="reverse", synthetic_max_len=8, synthetic_train_size=5000,
                        synthetic_val_size=100),
        train=TrainConfig(**train),
    )


@pytest.fixture(scope="session")
def reverse_run(tmp_path_factory):
    """A run directory of a small model trained to reverse strings of up to 8 letters (shared by tests)."""
    from transformer.train import Trainer

    out = tmp_path_factory.mktemp("reverse-run")
    record = Trainer(tiny_run_config(), out).train()
    return out, record


@pytest.fixture(scope="session")
def reverse_checkpoint(reverse_run):
    return reverse_run[0] / "best"
