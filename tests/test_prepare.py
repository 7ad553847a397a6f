"""Corpora prepared once into memory-mapped token arrays: the same pairs and batches as reading the files into
memory, found again by a second or resumed run, never trusted half-written; windowed batching for corpora
larger than a window."""

import json
import logging

import numpy as np
import pytest

from helpers import tiny_config
from transformer.batching import plan_batches, token_batches
from transformer.config import DataConfig, RunConfig, TrainConfig
from transformer.data import encode_pairs, read_parallel
from transformer.prepare import prepare
from transformer.tasks import build_task
from transformer.tokenizers import train_tokenizer

PAIRS = [
    ("a dog runs in the park", "ein hund rennt im park"),
    ("two cats sleep", "zwei katzen schlafen"),
    ("the man eats bread", "der mann isst brot"),
    ("", "leer"),
    (
        "a woman reads a long book today in the quiet garden behind the old house by the river",
        "eine frau liest heute ein langes buch im ruhigen garten hinter dem alten haus am fluss",
    ),
] * 9


def recipe(tmp_path, **data):
    (tmp_path / "train.en").write_text("\n".join(s for s, _ in PAIRS) + "\n")
    (tmp_path / "train.de").write_text("\n".join(t for _, t in PAIRS) + "\n")
    (tmp_path / "val.en").write_text("a dog runs\n")
    (tmp_path / "val.de").write_text("ein hund rennt\n")
    d = dict(
        train_src=str(tmp_path / "train.en"),
        train_tgt=str(tmp_path / "train.de"),
        val_src=str(tmp_path / "val.en"),
        val_tgt=str(tmp_path / "val.de"),
        vocab_size=150,
        max_len=10,
        cache_dir=str(tmp_path / "cache"),
    )
    d.update(data)
    return RunConfig(tiny_config(), DataConfig(**d), TrainConfig(max_tokens=40, seed=3))


def test_the_same_pairs_and_batches_as_reading_into_memory(tmp_path):
    run = recipe(tmp_path)
    task = build_task(run)
    # what the package did before preparation existed: read everything, train, encode, bucket
    src, tgt = read_parallel(run.data.train_src, run.data.train_tgt, None, "train")
    tok = train_tokenizer("bpe", [*src, *tgt], 150)
    pairs, stats = encode_pairs(tok, tok, src, tgt, 10)
    assert task.src_tok.tok.to_str() == tok.tok.to_str()
    assert [task.pairs.pair(i) for i in range(len(task.pairs))] == pairs
    assert task.pairs.stats["blank"] == stats.blank == 9 and task.pairs.stats["too_long"] == stats.too_long > 0
    lengths = [max(len(s), len(t) + 1) for s, t in pairs]
    for epoch in (0, 1):
        assert [b.tolist() for b in task.batches.of(epoch)] == token_batches(lengths, 40, 0, 3, epoch)


def test_a_second_run_finds_the_prepared_corpus(tmp_path, caplog):
    run = recipe(tmp_path)
    first = prepare(run)
    with caplog.at_level(logging.INFO, logger="transformer"):
        again = prepare(run)
        resumed = prepare(run, first.tokenizers)  # a resumed run brings the tokenizer its checkpoint holds
    assert again.directory == resumed.directory == first.directory
    assert caplog.text.count("using the prepared corpus") == 2
    (tmp_path / "train.en").write_text("changed\n" * len(PAIRS))  # a changed file is prepared again
    assert prepare(run).directory != first.directory


def test_an_interrupted_preparation_is_never_trusted(tmp_path, monkeypatch):
    run = recipe(tmp_path)
    from transformer import prepare as prep

    def broken(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_finish", broken)
    with pytest.raises(KeyboardInterrupt):
        prepare(run)
    assert not list((tmp_path / "cache").glob("*/meta.json"))  # nothing complete-looking was left
    monkeypatch.undo()
    assert len(prepare(run)) > 0


def test_windows_cover_every_example_once_within_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=5000).astype(np.int32)
    batches = plan_batches(lengths, 400, 0, seed=1, epoch=0, window=700)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(5000))
    assert all(int(lengths[b].max()) * len(b) <= 400 for b in batches)
    again = plan_batches(lengths, 400, 0, seed=1, epoch=0, window=700)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert not all(
        np.array_equal(a, b) for a, b in zip(batches, plan_batches(lengths, 400, 0, seed=1, epoch=1, window=700))
    )
    # within a window, examples are sorted by length: little padding
    pad = sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)
    assert pad / int(lengths.sum()) < 0.1


def test_language_model_text_is_two_token_streams(tmp_path):
    text = "".join(f"line {i}: to be or not to be\n" for i in range(300))
    (tmp_path / "t.txt").write_text(text)
    run = RunConfig(
        tiny_config("decoder-only"),
        DataConfig(
            task="lm", text=str(tmp_path / "t.txt"), tokenizer="char", block_size=8, cache_dir=str(tmp_path / "cache")
        ),
        TrainConfig(),
    )
    task = build_task(run)
    split = int(len(text) * 0.9)
    assert np.asarray(task.train_ids).tolist() == task.tok.encode(text[:split])
    assert np.asarray(task.val_ids).tolist() == task.tok.encode(text[split:])


def test_a_sentencepiece_tokenizer_and_one_reused(tmp_path):
    run = recipe(tmp_path, tokenizer="sentencepiece", max_len=40)
    task = build_task(run)
    assert task.src_tok.tok.to_str().count('"Unigram"') == 1
    task.src_tok.save(tmp_path / "tok.json")
    reused = build_task(recipe(tmp_path, tokenizer_from=str(tmp_path / "tok.json"), vocab_size=999, max_len=40))
    assert reused.src_tok.tok.to_str() == task.src_tok.tok.to_str()
    meta = json.loads((reused.pairs.directory / "meta.json").read_text())
    assert meta["kind"] == "pairs" and meta["kept"] == len(reused.pairs)
