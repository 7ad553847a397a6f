"""Nothing lost: every command that writes a directory writes only a new or empty one, or replaces output of its
own kind with --overwrite; it never deletes or mixes with files it did not write."""

import json
import os

import pytest

from helpers import tiny_model, tiny_run_config
from transformer import TransformerError
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.cli import main
from transformer.rundir import step_checkpoints
from transformer.tokenizers import CharTokenizer
from transformer.train import Trainer


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("transformer: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def tiny_checkpoint(path):
    tok = CharTokenizer("abc")
    model = tiny_model(vocab=7, tie_embeddings="all")
    return save_checkpoint(path, model, "translation", {"src": tok, "tgt": tok})


def bert_checkpoint(tmp_path, capsys):
    """An imported BERT: a checkpoint that a Hugging Face class represents (for export --to hf)."""
    from helpers import tiny_bert_dir

    hf, _ = tiny_bert_dir(tmp_path / "hf")
    assert main(["import", str(hf), "--out", str(tmp_path / "bert")]) == 0
    capsys.readouterr()
    return tmp_path / "bert"


@pytest.fixture
def ckpt(tmp_path):
    return tiny_checkpoint(tmp_path / "ckpt")


def someones(directory):
    """A directory holding a file of the user's."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "thesis.tex").write_text("three years of work")
    return directory


def test_a_checkpoint_is_never_written_over_other_files(tmp_path, ckpt):
    model = load_checkpoint(ckpt)
    target = someones(tmp_path / "mine")
    for overwrite in (False, True):  # not even with --overwrite
        with pytest.raises(TransformerError, match="does not hold a checkpoint .*'thesis.tex'"):
            save_checkpoint(target, model.model, "translation", model.tokenizers, overwrite=overwrite)
    assert [p.name for p in target.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mine"]  # no temporary leftovers
    # a checkpoint with a file of the user's added is not replaced either
    (ckpt / "notes.txt").write_text("mine")
    with pytest.raises(TransformerError, match="'notes.txt' is not part of one"):
        save_checkpoint(ckpt, model.model, "translation", model.tokenizers, overwrite=True)
    assert (ckpt / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["import", "average", "export-hf", "export-ct2"])
def test_commands_refuse_a_directory_that_holds_other_files(tmp_path, capsys, ckpt, command, monkeypatch):
    target = someones(tmp_path / "out")
    capsys.readouterr()
    if command == "import":
        from helpers import tiny_bert_dir

        hf, _ = tiny_bert_dir(tmp_path / "hf")
        capsys.readouterr()  # transformers' own progress bar while saving it
        args = ["import", hf, "--out", target]
    elif command == "average":
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        os.replace(ckpt, tmp_path / "run" / "checkpoints" / "step-0000010")
        args = ["average", tmp_path / "run", "--out", target]
    elif command == "export-hf":
        args = ["export", bert_checkpoint(tmp_path, capsys), target]
    else:
        pytest.importorskip("ctranslate2", reason="CTranslate2 is in the dev extra: pip install ctranslate2")
        args = ["export", ckpt, "--to", "ct2", target]
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(capsys, *args, *extra)
        one_line_error(code, err, str(target), "'thesis.tex'", "nothing was written")
    assert [p.name for p in target.iterdir()] == ["thesis.tex"]
    # --out . is refused as one line too (it was a ValueError traceback), and nothing is written there
    monkeypatch.chdir(someones(tmp_path / "cwd"))
    code, _, err = run_cli(capsys, *args[:-1], ".")
    one_line_error(code, err, "the current directory")
    assert [p.name for p in (tmp_path / "cwd").iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("to", ["hf", "ct2"])
def test_an_export_replaces_its_own_kind_only_with_overwrite(tmp_path, capsys, ckpt, to):
    if to == "ct2":
        pytest.importorskip("ctranslate2", reason="CTranslate2 is in the dev extra: pip install ctranslate2")
    else:
        ckpt = bert_checkpoint(tmp_path, capsys)
    out = tmp_path / "export"
    code, _, err = run_cli(capsys, "export", ckpt, "--to", to, out)
    assert code == 0, err
    written = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli(capsys, "export", ckpt, "--to", to, out)
    one_line_error(code, err, "already holds", "--overwrite replaces it")
    code, _, err = run_cli(capsys, "export", ckpt, "--to", to, out, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == written
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_averaging_a_run_into_itself_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_run_config(max_steps=4, eval_every=2, eval_bleu_sentences=5), run).train()
    capsys.readouterr()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, _, err = run_cli(capsys, "average", run, "--out", run)
    one_line_error(code, err, "does not hold a checkpoint")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_train_never_writes_into_a_directory_that_is_not_a_run(tmp_path):
    target = someones(tmp_path / "mine")
    for overwrite in (False, True):
        with pytest.raises(TransformerError, match="does not hold a training run"):
            Trainer(tiny_run_config(max_steps=2), target, overwrite=overwrite)
    assert [p.name for p in target.iterdir()] == ["thesis.tex"]


def test_train_overwrite_replaces_the_old_run_and_keeps_other_files(tmp_path):
    run = tmp_path / "run"
    # an old, longer run: step checkpoints up to 12 and four metrics lines
    Trainer(tiny_run_config(max_steps=12, eval_every=3, eval_bleu_sentences=5, keep_checkpoints=10), run).train()
    (run / "notes.txt").write_text("mine")
    assert len(step_checkpoints(run)) == 4
    with pytest.raises(TransformerError, match="already holds a training run; --overwrite"):
        Trainer(tiny_run_config(max_steps=4, eval_every=2, eval_bleu_sentences=5), run)
    Trainer(
        tiny_run_config(max_steps=4, eval_every=2, eval_bleu_sentences=5, average_last=5), run, overwrite=True
    ).train()
    # nothing of the old run is left to be averaged in or appended to
    assert [p.name for p in step_checkpoints(run)] == ["step-0000002", "step-0000004"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert load_checkpoint(run / "averaged").meta["averaged_from"] == [str(run / "checkpoints" / "step-0000004")]
    assert (run / "notes.txt").read_text() == "mine"


def test_step_checkpoints_are_ordered_by_step_number(tmp_path):
    for step in (999, 10000000, 5):
        (tmp_path / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-notes").mkdir()
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-0000005", "step-0000999", "step-10000000"]


def test_train_cli_refuses_a_run_without_overwrite(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("""
model: {d_model: 16, n_heads: 2, n_encoder_layers: 1, n_decoder_layers: 1, d_ff: 16, tie_embeddings: all}
data: {task: synthetic, synthetic_max_len: 4, synthetic_train_size: 200, synthetic_val_size: 5}
train: {max_tokens: 64, max_steps: 2, eval_every: 2, eval_bleu_sentences: 5, warmup_steps: 1, precision: fp32}
""")
    run = tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--out", run)[0] == 0
    code, _, err = run_cli(capsys, "train", cfg, "--out", run)
    one_line_error(code, err, "already holds a training run", "--overwrite")
    code, _, err = run_cli(
        capsys, "train", cfg, "--out", run, "--overwrite", "--set", "train.max_steps=4", "--set", "train.eval_every=4"
    )
    assert code == 0, err
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [4]


def test_an_os_error_is_one_line_naming_the_file(tmp_path, capsys, ckpt, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "avg" / "model.safetensors"))

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    os.replace(ckpt, tmp_path / "run" / "checkpoints" / "step-0000010")
    code, _, err = run_cli(capsys, "average", tmp_path / "run", "--out", tmp_path / "avg")
    one_line_error(code, err, "model.safetensors: No space left on device")
    assert not (tmp_path / "avg").exists()
