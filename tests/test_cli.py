"""End-to-end: the `transformer` command, in-process (fast) and once as a real subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.checkpoint import load_checkpoint
from transformer.cli import main

PAIRS = [
    ("a dog runs", "ein hund rennt"),
    ("a cat sleeps", "eine katze schläft"),
    ("the man eats", "der mann isst"),
    ("a woman reads", "eine frau liest"),
    ("two dogs play", "zwei hunde spielen"),
    ("the child laughs", "das kind lacht"),
] * 6


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("transformer: error:")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def parallel_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "train.en").write_text("\n".join(s for s, _ in PAIRS) + "\n")
    (d / "train.de").write_text("\n".join(t for _, t in PAIRS) + "\n")
    (d / "val.en").write_text("\n".join(s for s, _ in PAIRS[:6]) + "\n")
    (d / "val.de").write_text("\n".join(t for _, t in PAIRS[:6]) + "\n")
    cfg = d / "tiny.yaml"
    cfg.write_text(f"""
model: {{d_model: 32, n_heads: 2, n_encoder_layers: 1, n_decoder_layers: 1, d_ff: 64, tie_embeddings: all}}
data:
  train_src: {d / "train.en"}
  train_tgt: {d / "train.de"}
  val_src: {d / "val.en"}
  val_tgt: {d / "val.de"}
  vocab_size: 120
train: {{max_tokens: 200, max_steps: 6, eval_every: 3, warmup_steps: 2, log_every: 1}}
""")
    return d, cfg


def test_train_translate_evaluate_average(tmp_path, capsys, parallel_files):
    d, cfg = parallel_files
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", cfg, "--out", run, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["step"] == 6 and "bleu" in result and "val_loss" in result
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    code, out, _ = run_cli(capsys, "translate", run / "best", "a dog runs", "", "the man eats", "--beam", "2")
    assert code == 0 and len(out.splitlines()) == 3 and out.splitlines()[1] == ""
    code, out, _ = run_cli(
        capsys, "evaluate", run / "best", "--src", d / "val.en", "--ref", d / "val.de", "--json", "--beam", "3"
    )
    assert code == 0
    scores = json.loads(out)
    assert {"bleu", "chrf", "signature", "sentences", "seconds"} <= set(scores) and scores["sentences"] == 6
    assert "nrefs:1|case:mixed|eff:no|tok:13a" in scores["signature"]["bleu"]
    code, out, _ = run_cli(capsys, "average", run, "--last", "2")
    assert code == 0 and (run / "averaged" / "model.safetensors").is_file()
    # training again into the same directory is refused rather than overwriting it
    code, _, err = run_cli(capsys, "train", cfg, "--out", run)
    assert_user_error(code, err, "already holds a training run", "--resume")
    code, out, _ = run_cli(capsys, "train", "--resume", run, "--set", "train.max_steps=8", "--json")
    assert code == 0 and json.loads(out)["step"] == 8


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing", ["nope.en: train source file not found"]),
        ("counts", ["has 36 lines but", "line-aligned"]),
        ("empty", ["empty.en: train source file is empty"]),
        ("utf8", ["bad.en:2: invalid UTF-8"]),
        ("key", ["unknown key 'train.max_step'", "did you mean 'train.max_steps'"]),
        ("type", ["train.max_steps='many': expected an integer"]),
        ("required", ["needs both train_src and train_tgt"]),
        ("directory", ["is a directory, expected a text file"]),
        ("range", ["train.label_smoothing=1.5: must be in [0, 1)"]),
    ],
)
def test_bad_training_input(tmp_path, capsys, parallel_files, case, needles):
    d, cfg = parallel_files
    (tmp_path / "empty.en").write_text("")
    (tmp_path / "bad.en").write_bytes(b"ok\n\xc3\x28 broken\n")
    (tmp_path / "short.de").write_text("eins\nzwei\n")
    sets = {
        "missing": ["data.train_src=" + str(tmp_path / "nope.en")],
        "counts": ["data.train_tgt=" + str(tmp_path / "short.de")],
        "empty": ["data.train_src=" + str(tmp_path / "empty.en")],
        "utf8": ["data.train_src=" + str(tmp_path / "bad.en")],
        "key": ["train.max_step=3"],
        "type": ["train.max_steps=many"],
        "required": ["data.train_src="],
        "directory": ["data.train_src=" + str(tmp_path)],
        "range": ["train.label_smoothing=1.5"],
    }[case]
    args = ["train", cfg, "--out", tmp_path / "run"]
    for s in sets:
        args += ["--set", s]
    code, _, err = run_cli(capsys, *args)
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "run" / "last").exists()


def test_translate_reads_stdin(capsys, monkeypatch, reverse_checkpoint):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("abc\nhello\n"))
    code, out, _ = run_cli(capsys, "translate", reverse_checkpoint)
    assert code == 0 and out.splitlines() == ["cba", "olleh"]


def test_translate_input_file(tmp_path, capsys, reverse_checkpoint):
    (tmp_path / "in.txt").write_text("abc\r\nxyz\r\n")
    code, out, _ = run_cli(capsys, "translate", reverse_checkpoint, "--input", tmp_path / "in.txt", "--beam", "3")
    assert code == 0 and out.splitlines() == ["cba", "zyx"]
    code, out, _ = run_cli(capsys, "translate", reverse_checkpoint, "--input", tmp_path / "in.txt", "--bf16")
    assert code == 0 and out.splitlines() == ["cba", "zyx"]
    code, out, _ = run_cli(
        capsys, "translate", reverse_checkpoint, "--input", tmp_path / "in.txt", "--int8", "--beam", "2"
    )
    assert code == 0 and out.splitlines() == ["cba", "zyx"]
    code, _, err = run_cli(capsys, "translate", reverse_checkpoint, "abc", "--int8", "--bf16")
    assert_user_error(code, err, "choose one of --bf16 and --int8")


def test_command_line_mistakes(tmp_path, capsys, reverse_checkpoint):
    code, _, err = run_cli(capsys, "translate", tmp_path / "nowhere", "abc")
    assert_user_error(code, err, "nowhere: checkpoint directory not found")
    (tmp_path / "not-ckpt").mkdir()
    code, _, err = run_cli(capsys, "translate", tmp_path / "not-ckpt", "abc")
    assert_user_error(code, err, "config.json: missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(reverse_checkpoint).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "tokenizer.json").write_text("{oops")
    code, _, err = run_cli(capsys, "translate", broken, "abc")
    assert_user_error(code, err, "tokenizer.json: the file differs from the one saved")
    (broken / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "translate", broken, "abc")
    assert_user_error(code, err, "tokenizer.json: tokenizer file not found")
    code, _, err = run_cli(capsys, "generate", reverse_checkpoint)
    assert_user_error(code, err, "needs a 'lm' one")
    code, _, err = run_cli(capsys, "translate", reverse_checkpoint, "--input", tmp_path / "none.txt")
    assert_user_error(code, err, "none.txt: input file not found")
    with pytest.raises(SystemExit) as e:  # argparse: invalid option values exit 2 with a usage line
        main(["translate", str(reverse_checkpoint), "abc", "--beam", "0"])
    assert e.value.code == 2
    assert "--beam: must be >= 1" in capsys.readouterr().err


def test_demo_command_as_a_real_process(tmp_path):
    """The command runs as its own process (a short demo), prints one JSON object and saves a checkpoint."""
    cli = [sys.executable, "-m", "transformer"]
    proc = subprocess.run(
        [*cli, "demo", "--steps", "30", "--json", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["steps"] == 30 and result["held_out"] == 500 and result["task"] == "reverse"
    # what it reports is what its checkpoint does: the examples' outputs come from the saved model
    from transformer.generate import translate_texts

    ckpt = load_checkpoint(result["checkpoint"])
    inputs = [e["input"] for e in result["examples"]]
    assert [e["expected"] for e in result["examples"]] == [s[::-1] for s in inputs]
    assert translate_texts(ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, inputs) == [
        e["output"] for e in result["examples"]
    ]
    shown = sum(e["output"] == e["expected"] for e in result["examples"])
    assert result["exact_match"] * 500 >= shown  # every right example is counted
    bad = subprocess.run([*cli, "translate", str(tmp_path / "missing"), "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_language_model_train_and_generate(tmp_path, capsys):
    text = "".join(f"To be, or not to be{'!' * (i % 3)}\nthat is the question.\n" for i in range(300))
    (tmp_path / "text.txt").write_text(text)
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(f"""
model: {{arch: decoder-only, d_model: 32, n_heads: 2, n_decoder_layers: 2, d_ff: 64, dropout: 0.0,
        norm_first: true, positional: learned, max_positions: 32, tie_embeddings: decoder}}
data: {{task: lm, text: {tmp_path / "text.txt"}, tokenizer: char, block_size: 32}}
train: {{batch_size: 8, lr: 3.0e-3, warmup_steps: 10, schedule: cosine, max_steps: 150, eval_every: 75,
        label_smoothing: 0.0}}
""")
    code, out, _ = run_cli(capsys, "train", cfg, "--out", tmp_path / "run", "--json")
    assert code == 0
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [75, 150]
    assert lines[-1]["val_loss"] < 1.0  # a repetitive text is learned well below uniform (ln 20 = 3.0)
    args = ["generate", tmp_path / "run" / "best", "--prompt", "To be", "--max-new-tokens", "60", "--seed", "3"]
    code, first, _ = run_cli(capsys, *args)
    assert code == 0 and first.startswith("To be") and len(first) >= 60
    code, again, _ = run_cli(capsys, *args)
    assert again == first  # a fixed seed reproduces the text
    greedy_a = run_cli(capsys, *args[:-2], "--seed", "1", "--temperature", "0")[1]
    greedy_b = run_cli(capsys, *args[:-2], "--seed", "2", "--temperature", "0")[1]
    assert greedy_a == greedy_b  # temperature 0 is greedy: no randomness left
    for bad, needle in [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-k", "-2"], "--top-k"),
    ]:
        code, _, err = run_cli(capsys, *args, *bad)
        assert_user_error(code, err, needle)
    code, _, err = run_cli(capsys, "translate", tmp_path / "run" / "best", "x")
    assert_user_error(code, err, "'lm' checkpoint, but this command needs a 'translation' one")


def test_awkward_inference_input(tmp_path, capsys, reverse_checkpoint):
    # whitespace-only and empty lines give empty lines; characters never seen in training do not crash
    code, out, _ = run_cli(capsys, "translate", reverse_checkpoint, "   ", "", "abc", "héllo wörld ✓")
    assert code == 0 and out.split("\n")[:3] == ["", "", "cba"] and len(out.splitlines()) == 4
    code, _, err = run_cli(capsys, "translate", reverse_checkpoint, "abc", "--max-len-b", "-1")
    assert_user_error(code, err, "must not be negative")


def test_over_long_pairs_are_dropped_and_counted(tmp_path, capsys, parallel_files, caplog):
    d, cfg = parallel_files
    src = (d / "train.en").read_text().splitlines()
    tgt = (d / "train.de").read_text().splitlines()
    src[0] = " ".join(["dog"] * 10_000)  # a 10,000-token line
    src[1] = ""  # and a blank one
    (tmp_path / "train.en").write_text("\n".join(src) + "\n")
    (tmp_path / "train.de").write_text("\n".join(tgt) + "\n")
    with caplog.at_level("INFO", logger="transformer"):
        code, _, _ = run_cli(
            capsys,
            "train",
            cfg,
            "--out",
            tmp_path / "run",
            "--set",
            f"data.train_src={tmp_path / 'train.en'}",
            "--set",
            f"data.train_tgt={tmp_path / 'train.de'}",
            "--set",
            "train.max_steps=2",
        )
    assert code == 0
    assert "34 kept, 1 blank dropped, 1 longer than 128 tokens dropped" in caplog.text


def test_long_input_is_truncated_to_learned_positions(tmp_path, capsys, caplog):
    from helpers import tiny_model
    from transformer.checkpoint import save_checkpoint
    from transformer.tokenizers import CharTokenizer

    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    model = tiny_model(seed=None, vocab=30, positional="learned", max_positions=16)
    save_checkpoint(tmp_path / "ckpt", model, "translation", {"src": tok, "tgt": tok})
    with caplog.at_level("WARNING", logger="transformer"):
        code, out, _ = run_cli(
            capsys, "translate", tmp_path / "ckpt", "a" * 100, "--max-len-a", "0", "--max-len-b", "8"
        )
    assert code == 0 and len(out.splitlines()) == 1
    assert "1 input(s) longer than the model's 16 positions were truncated" in caplog.text
