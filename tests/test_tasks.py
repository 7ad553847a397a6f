"""transformer.tasks: the batches a task gives the trainer, and how it is scored."""

import dataclasses
from collections import Counter

import pytest
import torch

from helpers import tiny_run_config
from transformer.batching import Batch
from transformer.errors import DataError
from transformer.task_registry import TASKS
from transformer.tasks import (
    ClassificationTask,
    LanguageModelTask,
    TranslationTask,
    build_task,
    classification_scores,
)
from transformer.tokenizers import BOS, EOS, PAD, CharTokenizer

MAX_TOKENS = 96  # small, so that each epoch has many batches and the budget binds


def small_run(seed=0, max_tokens=MAX_TOKENS, batch_size=0, **data):
    run = tiny_run_config(max_tokens=max_tokens, seed=seed, batch_size=batch_size)
    return dataclasses.replace(
        run, data=dataclasses.replace(run.data, **{"synthetic_train_size": 300, "synthetic_val_size": 20, **data})
    )


@pytest.fixture(scope="module")
def task():
    return build_task(small_run())


def unpad(row):
    ids = row.tolist()
    while ids and ids[-1] == PAD:
        ids.pop()
    return ids


def batch_pairs(batch: Batch):
    """The (source, target) pairs a batch holds, read back from its tensors."""
    return [(tuple(unpad(s)), tuple(unpad(t)[:-1])) for s, t in zip(batch.src, batch.tgt_out)]


def epoch(task, e):
    return [task.batch(e, i) for i in range(task.num_batches(e))]


def test_build_task_gives_the_synthetic_translation_task(task):
    assert isinstance(task, TranslationTask)
    assert task.name == "synthetic"
    assert task.metric == TASKS["synthetic"].metric == "exact_match"
    assert task.tokenizers["src"] is task.tokenizers["tgt"]
    assert len(task.pairs) == 300 and len(task.val_src) == 20


def test_every_training_example_is_in_exactly_one_batch_of_an_epoch(task):
    expected = Counter((tuple(s), tuple(t)) for s, t in task.pairs.pairs)
    for e in (0, 1):
        seen = Counter(p for b in epoch(task, e) for p in batch_pairs(b))
        assert seen == expected
        indices = sorted(int(j) for idx in task.batches.of(e) for j in idx)
        assert indices == list(range(len(task.pairs)))


def test_each_batch_respects_the_token_budget_and_sentence_limit():
    for batch_size in (0, 5):
        t = build_task(small_run(batch_size=batch_size))
        for b in epoch(t, 0):
            rows, width = b.src.size(0), max(b.src.size(1), b.tgt_in.size(1))
            assert rows * width <= MAX_TOKENS, (rows, width)  # padded positions, the longest times the count
            if batch_size:
                assert rows <= batch_size


def test_batches_are_a_function_of_seed_and_epoch():
    a, b = build_task(small_run(seed=3)), build_task(small_run(seed=3))
    first = epoch(a, 2)
    again = epoch(b, 2)
    assert len(first) == len(again)
    for x, y in zip(first, again):
        assert torch.equal(x.src, y.src) and torch.equal(x.tgt_in, y.tgt_in) and torch.equal(x.tgt_out, y.tgt_out)
    # asked out of order, after another epoch, the same batch comes back (resuming needs no state)
    a.batch(0, 0)
    assert torch.equal(a.batch(2, 1).src, first[1].src)
    other_epoch = epoch(a, 3)
    assert [batch_pairs(x) for x in other_epoch] != [batch_pairs(x) for x in first]


def test_a_batch_is_the_shifted_target_with_begin_and_end_tokens(task):
    tok = task.tokenizers["src"]
    for b in epoch(task, 0)[:5]:
        assert b.n_tokens == int((b.tgt_out != PAD).sum())
        for src, tgt_in, tgt_out in zip(b.src, b.tgt_in, b.tgt_out):
            s, ti, to = unpad(src), unpad(tgt_in), unpad(tgt_out)
            assert ti[0] == BOS and to[-1] == EOS and ti[1:] == to[:-1]
            assert tok.decode(to[:-1]) == tok.decode(s)[::-1]  # the reverse task


def test_the_padding_fraction_is_that_of_the_batches(task):
    pad = total = 0
    for b in epoch(task, 0):
        width = max(b.src.size(1), b.tgt_in.size(1))
        lengths = [max(len(unpad(s)), len(unpad(t))) for s, t in zip(b.src, b.tgt_in)]
        pad += width * len(lengths) - sum(lengths)
        total += width * len(lengths)
    assert task.padding_fraction(0) == pytest.approx(pad / total, abs=1e-12)
    assert 0 <= task.padding_fraction(0) < 0.5


def test_validation_sources_are_never_training_sources(task):
    tok = task.tokenizers["src"]
    train_sources = {tok.decode(s) for s, _ in task.pairs.pairs}
    assert not train_sources & set(task.val_src)
    assert task.val_tgt == [s[::-1] for s in task.val_src]


def test_given_tokenizers_are_reused():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    t = build_task(small_run(), tokenizers={"src": tok, "tgt": tok})
    assert t.tokenizers["src"] is tok and t.tokenizers["tgt"] is tok


def test_the_synthetic_data_follows_the_seed():
    assert build_task(small_run(seed=1)).val_src != build_task(small_run(seed=2)).val_src


def test_each_task_metric_is_the_registry_s():
    assert LanguageModelTask.metric == TASKS["lm"].metric
    assert ClassificationTask.metric == TASKS["classification"].metric
    assert LanguageModelTask.name == "lm" and ClassificationTask.name == "classification"


def test_build_task_refuses_incomplete_recipes():
    run = tiny_run_config()
    no_val = dataclasses.replace(run, data=dataclasses.replace(run.data, task="translation"))
    with pytest.raises(DataError, match="no validation data"):
        build_task(no_val)
    classification = dataclasses.replace(run, data=dataclasses.replace(run.data, task="classification"))
    with pytest.raises(DataError, match="needs data.train_tsv and data.val_tsv"):
        build_task(classification)


# ----------------------------------------------------------------------------------------------------------
# The language model and classification tasks, built from data in memory


def lm_run(block_size=8, max_tokens=32, batch_size=0):
    run = tiny_run_config(max_tokens=max_tokens, batch_size=batch_size)
    return dataclasses.replace(
        run, data=dataclasses.replace(run.data, task="lm", text="text.txt", block_size=block_size)
    )


def test_language_model_batches_are_windows_and_their_next_tokens():
    ids = torch.arange(200)  # each token is its position: a window's content shows where it was taken
    task = LanguageModelTask(lm_run(), CharTokenizer("ab"), ids, torch.arange(50), eval_batches=2)
    assert task.batch_size == 32 // 8
    assert task.num_batches(0) == 200 // (4 * 8)
    b = task.batch(0, 3)
    assert b.x.shape == b.y.shape == (4, 8) and b.n_tokens == 32
    assert torch.equal(b.y, b.x + 1)  # the next token of each
    assert torch.equal(b.x - b.x[:, :1], torch.arange(8).expand(4, 8))  # contiguous windows
    assert torch.equal(task.batch(0, 3).x, b.x)  # deterministic in (seed, epoch, i)
    assert not torch.equal(task.batch(1, 3).x, b.x)
    assert task.padding_fraction(0) == 0.0


def test_a_language_model_text_shorter_than_a_block_names_the_split():
    with pytest.raises(
        DataError, match=r"text\.txt: the validation split has 8 tokens, fewer than data.block_size\+1=9"
    ):
        LanguageModelTask(lm_run(block_size=8), CharTokenizer("ab"), torch.arange(100), torch.arange(8))
    with pytest.raises(DataError, match="the training split has 3 tokens"):
        LanguageModelTask(lm_run(block_size=8), CharTokenizer("ab"), torch.arange(3), torch.arange(100))


def test_classification_batches_cover_every_example_once_with_its_label():
    run = tiny_run_config(max_tokens=40, batch_size=4)
    train = [([5 + (i % 7)] * (1 + i % 9), i % 3) for i in range(60)]
    task = ClassificationTask(run, CharTokenizer("ab"), ["x", "y", "z"], train, ["a"], [0])
    assert task.meta == {"labels": ["x", "y", "z"]}
    seen = Counter()
    for i in range(task.num_batches(0)):
        b = task.batch(0, i)
        assert b.ids.size(0) <= 4 and b.ids.numel() <= 40 and b.n_tokens == b.ids.size(0)
        seen.update((tuple(unpad(row)), int(label)) for row, label in zip(b.ids, b.labels))
    assert seen == Counter((tuple(ids), c) for ids, c in train)


def test_classification_scores():
    scores = classification_scores([0, 1, 1, 2], [0, 1, 2, 2], 3)
    assert scores["accuracy"] == pytest.approx(0.75)
    # per-class F1: class 0 1.0; class 1 precision 1/2 recall 1: 2/3; class 2 precision 1 recall 1/2: 2/3
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
