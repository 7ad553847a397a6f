"""Preparing a corpus safely: the cache key sees every change of the data and of a reused tokenizer, a file
cut between the passes is an error (never a hang), and preparations of one corpus at once, or after an
interrupted one, share one complete directory."""

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_prepare import recipe

from helpers import tiny_config
from transformer import prepare as prep
from transformer.config import DataConfig, RunConfig, TrainConfig
from transformer.errors import DataError
from transformer.prepare import prepare
from transformer.tokenizers import CharTokenizer

WAIT = 120  # seconds a test waits for a preparation before calling it hung (one takes well under a second)


def run_in_thread(fn, *args):
    """Start fn(*args) in a daemon thread (a hung one cannot keep the test session alive); returns the thread
    and a dict that gets the "result" or the "error"."""
    out = {}

    def body():
        try:
            out["result"] = fn(*args)
        except BaseException as e:  # handed to the test, which asserts on it
            out["error"] = e

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def test_a_same_size_edit_with_its_old_mtime_is_prepared_again(tmp_path):
    """Bug: files were known by path, size and mtime only, so an edit of the same size whose mtime was kept
    (`cp -p`, `touch -r`) reused the corpus of the old text."""
    run = recipe(tmp_path)
    first = prepare(run)
    path = tmp_path / "train.en"
    before = path.stat()
    text = path.read_text()
    path.write_text(text.replace("dog", "cat"))  # in place: the same inode and size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    again = prepare(run)
    assert again.directory != first.directory
    assert again.tokenizers["src"].tok.to_str() != first.tokenizers["src"].tok.to_str()  # trained on the new text


def test_a_reused_tokenizer_is_keyed_by_its_content_not_its_path(tmp_path):
    """Bug: `data.tokenizer_from` entered the key as a path, so another tokenizer saved over the same file
    reused the corpus encoded with the old one."""
    tok = tmp_path / "tok.json"
    CharTokenizer(list("abcdefghij")).save(tok)
    run = recipe(tmp_path, tokenizer="char", tokenizer_from=str(tok), max_len=200)
    key = prep._key(run, None)
    CharTokenizer(list("abcdefghij")).save(tok)  # the same content written again: the same corpus
    assert prep._key(run, None) == key
    first = prepare(run)
    CharTokenizer(list("abcdefghijklmnopqrstuvwxyz ")).save(tok)
    assert prep._key(run, None) != key
    again = prepare(run)
    assert again.directory != first.directory and again.tokenizers["src"].vocab_size == 4 + 27


def test_a_text_cut_between_the_passes_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """Bug: a language-model text that got shorter after its size was taken made `_text_blocks` read the end
    of the file forever."""
    path = tmp_path / "t.txt"
    path.write_text("".join(f"line {i}: to be or not to be\n" for i in range(300)))
    run = RunConfig(
        tiny_config("decoder-only"),
        DataConfig(task="lm", text=str(path), tokenizer="char", block_size=8, cache_dir=str(tmp_path / "cache")),
        TrainConfig(),
    )
    real = prep._tokenizers

    def then_cut(*args):  # between the tokenizer's sample and the encoding passes, the file loses its end
        toks = real(*args)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 3 - 5)  # inside a line: a last line without its newline
        return toks

    monkeypatch.setattr(prep, "_tokenizers", then_cut)
    thread, out = run_in_thread(prepare, run)
    thread.join(WAIT)
    assert not thread.is_alive(), "preparing a text cut between the passes hung"
    assert isinstance(out.get("error"), DataError), out
    assert str(out["error"]).startswith(f"{path}: the file changed while being prepared")
    assert not list((tmp_path / "cache").glob("*/meta.json")) and not list((tmp_path / "cache").glob(".tmp-*"))


def test_two_preparations_at_once_make_one_corpus(tmp_path, monkeypatch):
    """Bug: two preparations of one recipe at once both prepared it, and the later rename failed with a raw
    OSError. Now the second waits for the first's lock and uses its corpus."""
    run = recipe(tmp_path)
    real, builds = prep._prepare_pairs, []
    building, release = threading.Event(), threading.Event()

    def held(*args):  # the first preparation stays in progress until the test releases it
        builds.append(threading.current_thread().name)
        building.set()
        release.wait(WAIT)
        return real(*args)

    monkeypatch.setattr(prep, "_prepare_pairs", held)
    first, first_out = run_in_thread(prepare, run)
    assert building.wait(WAIT)
    second, second_out = run_in_thread(prepare, run)
    second.join(0.5)  # long enough for it to reach the lock (and, unlocked, to start a preparation of its own)
    assert second.is_alive() and len(builds) == 1
    release.set()
    for thread in (first, second):
        thread.join(WAIT)
        assert not thread.is_alive()
    assert "error" not in first_out and "error" not in second_out, (first_out, second_out)
    assert first_out["result"].directory == second_out["result"].directory and len(builds) == 1
    assert len(second_out["result"]) == len(first_out["result"]) > 0


PREPARE = """
import pickle, sys
from transformer.prepare import prepare
print(prepare(pickle.loads(open(sys.argv[1], "rb").read())).directory)
"""


def test_two_processes_preparing_at_once_both_succeed(tmp_path):
    run = recipe(tmp_path)
    (tmp_path / "run.pkl").write_bytes(pickle.dumps(run))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(prep.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(tmp_path / "run.pkl")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=WAIT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    dirs = {out.strip() for out, _ in results}
    assert len(dirs) == 1 and (Path(dirs.pop()) / "meta.json").is_file()
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_an_interrupted_preparations_leftovers_are_removed_by_the_next(tmp_path):
    """Bug: a preparation killed before it finished left its `.tmp-*` directory in the cache forever."""
    run = recipe(tmp_path)
    cache, key = tmp_path / "cache", prep._key(run, None)
    stale = cache / f".tmp-{key}-0badf00d"
    (stale / "sub").mkdir(parents=True)
    (stale / "src.bin").write_bytes(b"\0" * 100)
    other = cache / ".tmp-0123456789abcdef0123-0badf00d"  # another corpus's: perhaps in progress, so kept
    other.mkdir()
    prepared = prepare(run)
    assert prepared.directory == cache / key and len(prepared) > 0
    assert not stale.exists() and other.is_dir()


def test_the_final_rename_keeps_a_corpus_already_in_place(tmp_path):
    """A complete corpus moved into place meanwhile (by a process that took no lock) is kept and this one's
    dropped; a directory in the way that is no complete corpus is an error naming it, not a raw OSError."""
    run = recipe(tmp_path)
    theirs = prepare(run)
    content = {f.name: f.read_bytes() for f in theirs.directory.iterdir()}
    mine = tmp_path / "cache" / ".tmp-mine"
    (mine / "src.bin").parent.mkdir()
    (mine / "src.bin").write_bytes(b"mine")
    prep._finish(mine, theirs.directory, {"format": prep.FORMAT})
    assert not mine.exists() and {f.name: f.read_bytes() for f in theirs.directory.iterdir()} == content
    (tmp_path / "cache" / "broken").mkdir()
    (tmp_path / "cache" / "broken" / "src.bin").write_bytes(b"half")
    mine.mkdir()
    with pytest.raises(DataError, match=r"broken: cannot move the prepared corpus into place .* remove that directory"):
        prep._finish(mine, tmp_path / "cache" / "broken", {"format": prep.FORMAT})
