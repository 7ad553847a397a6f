"""Fine-tuning an imported encoder on labelled text: the classification task, `model.init_from`, the head's
own learning rate, `classify` and `evaluate --data`, and clear errors for bad files."""

import json

import pytest

pytest.importorskip("transformers", reason="the tiny pretrained model is made by transformers (the dev extra)")

from helpers import tiny_bert_dir  # noqa: E402
from transformer.cli import main  # noqa: E402
from transformer.data import label_names, read_labelled  # noqa: E402
from transformer.errors import DataError  # noqa: E402

TEXTS = [
    "the big dog runs",
    "a small cat sleeps",
    "a dog sleeps",
    "the bird sings",
    "the small dogs run",
    "a big cat runs",
    "the dog",
    "a bird sleeps",
    "big dogs sing",
    "the cat sings",
]


def tsv(path, rows, header="label\tsentence"):
    path.write_text("\n".join([header] * bool(header) + [f"{l}\t{t}" for l, t in rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert")
    hf_dir, _ = tiny_bert_dir(tmp / "hf")
    assert main(["import", str(hf_dir), "--out", str(tmp / "ckpt")]) == 0
    rows = [("pos" if "dog" in t else "neg", t) for t in TEXTS]  # learnable: is there a dog?
    return tmp, tsv(tmp / "train.tsv", rows * 8), tsv(tmp / "dev.tsv", rows, header="label\tcontent")


def test_fine_tuning_learns_and_the_commands_use_it(imported, capsys, caplog):
    tmp, train, dev = imported
    cfg = tmp / "ft.yaml"
    cfg.write_text(f"""
model: {{init_from: {tmp / "ckpt"}, pooling: cls, pooler: false, dropout: 0.0, attention_dropout: 0.0}}
data: {{task: classification, train_tsv: {train}, val_tsv: {dev}, max_len: 16}}
train: {{batch_size: 8, max_tokens: 512, lr: 1.0e-3, head_lr: 3.0e-3, schedule: linear, warmup_steps: 5,
        max_steps: 60, eval_every: 30, label_smoothing: 0.0, precision: fp32, weight_decay: 0.01}}
""")
    with caplog.at_level("WARNING", logger="transformer"):
        assert main(["train", str(cfg), "--out", str(tmp / "run"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == 1.0 and "macro_f1" in result
    assert "initialised afresh: classifier.weight, classifier.bias" in caplog.text
    assert "not used by this model: pooler.bias, pooler.weight" in caplog.text  # the import kept BERT's pooler
    best = tmp / "run" / "best"
    assert main(["classify", str(best), "a big dog", "the small cat", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["label"] for p in predictions] == ["pos", "neg"]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in predictions)
    assert main(["evaluate", str(best), "--data", str(dev), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["accuracy"] == 1.0 and scores["macro_f1"] == 1.0 and scores["examples"] == len(TEXTS)


def test_the_new_head_has_its_own_learning_rate(imported):
    from transformer.config import load_run_config
    from transformer.train import Trainer

    tmp, train, dev = imported
    cfg = tmp / "lr.yaml"
    cfg.write_text(f"""
model: {{init_from: {tmp / "ckpt"}}}
data: {{task: classification, train_tsv: {train}, val_tsv: {dev}}}
train: {{batch_size: 8, lr: 1.0e-4, head_lr: 2.0e-3, schedule: linear, warmup_steps: 1, max_epochs: 2,
        weight_decay: 0.1, precision: fp32}}
""")
    trainer = Trainer(load_run_config(cfg), tmp / "lr-run")
    groups = {
        (g["peak"], g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in trainer.optimizer.param_groups
    }
    head = trainer.model.classifier
    assert groups[(2.0e-3, 0.1)] == head.weight.numel() and groups[(2.0e-3, 0.0)] == head.bias.numel()
    assert (1.0e-4, 0.0) in groups and (1.0e-4, 0.1) in groups  # biases and LayerNorm never decay
    assert trainer.total_steps == 2 * trainer.task.num_batches(0)  # "linear" ends with the epochs


@pytest.mark.parametrize(
    "rows, needle",
    [
        (["pos\tthe dog", "neg"], "train.tsv:3: expected 'label<TAB>text', found no text"),
        (["pos\tthe dog", "\ta cat"], "train.tsv:3: expected 'label<TAB>text', found no label"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, rows, needle):
    (tmp_path / "train.tsv").write_text("label\ttext\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=needle):
        read_labelled(tmp_path / "train.tsv", "training file")


def test_unknown_label_in_dev_is_an_error(tmp_path, capsys, imported):
    tmp, train, _ = imported
    bad = tsv(tmp_path / "dev.tsv", [("pos", "a dog"), ("maybe", "a cat")])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
model: {{init_from: {tmp / "ckpt"}}}
data: {{task: classification, train_tsv: {train}, val_tsv: {bad}}}
train: {{max_steps: 2}}
""")
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dev.tsv:3: label 'maybe' is not one of the training labels (neg, pos)" in err


def test_labels_are_numbered_in_a_natural_order():
    assert label_names(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_names(["pos", "neg", "neutral"]) == ["neg", "neutral", "pos"]
