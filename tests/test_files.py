"""transformer.files: atomic writes, output-directory checks, whole-directory replacement, the cache location."""

import json
import os
import stat

import pytest

from transformer import files
from transformer.errors import CheckpointError, TransformerError


def leftovers(directory):
    """Hidden temporary files or directories the writers leave beside their target (".NAME.*.tmp/.old")."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------------
# Atomic writes


def test_write_text_atomic_writes_the_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # a missing parent is created
    files.write_text_atomic(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert leftovers(target.parent) == []
    files.write_text_atomic(target, "second")  # replaces the old content whole
    assert target.read_text(encoding="utf-8") == "second"
    assert leftovers(target.parent) == []


def test_write_json_atomic_round_trips(tmp_path):
    obj = {"a": [1, 2.5, None], "ü": "ß"}
    files.write_json_atomic(tmp_path / "x.json", obj)
    assert json.loads((tmp_path / "x.json").read_text(encoding="utf-8")) == obj
    assert "ü" in (tmp_path / "x.json").read_text(encoding="utf-8")  # ensure_ascii=False: readable as written


def test_a_failing_rename_leaves_the_old_target_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")

    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        files.write_text_atomic(target, "new content that must never be seen half-written")
    assert target.read_text(encoding="utf-8") == "old"
    assert leftovers(tmp_path) == []


def test_an_exception_inside_the_block_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="killed"):
        with files.atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp != target  # a sibling, so the rename stays atomic
            tmp.write_text("half wri", encoding="utf-8")
            raise RuntimeError("killed mid-write")
    assert target.read_text(encoding="utf-8") == "old"
    assert leftovers(tmp_path) == []


def test_a_new_target_is_not_created_when_the_write_fails(tmp_path):
    target = tmp_path / "never.txt"
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("partial", encoding="utf-8")
            raise RuntimeError
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_read_json_names_the_file_for_missing_and_invalid_content(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(CheckpointError) as e:
        files.read_json(missing, CheckpointError, "no such file; run X first")
    assert str(e.value) == f"{missing}: no such file; run X first"

    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"bad\.json: unreadable config \(") as e:
        files.read_json(bad, CheckpointError, "missing", what=" config")
    assert str(e.value).startswith(f"{bad}: ")

    (tmp_path / "ok.json").write_text('[1, "a"]', encoding="utf-8")
    assert files.read_json(tmp_path / "ok.json", CheckpointError, "missing") == [1, "a"]


# ----------------------------------------------------------------------------------------------------------
# check_output_dir


def own_checkpoint(path):
    """`holds` for a made-up kind: a directory is one when it holds only 'weights' and 'meta.json'."""
    return files.foreign_entries(path, lambda name: name in ("weights", "meta.json"))


def test_a_missing_or_empty_directory_may_be_written(tmp_path):
    assert files.check_output_dir(tmp_path / "new", "checkpoint", own_checkpoint, overwrite=False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert files.check_output_dir(tmp_path / "empty", "checkpoint", own_checkpoint, False) == tmp_path / "empty"


def test_a_directory_of_the_same_kind_needs_overwrite_and_the_message_names_the_flag(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "weights").write_text("w")
    with pytest.raises(TransformerError) as e:
        files.check_output_dir(d, "checkpoint", own_checkpoint, overwrite=False, flag="--force")
    assert str(e.value) == f"{d}: already holds a checkpoint; --force replaces it"
    assert files.check_output_dir(d, "checkpoint", own_checkpoint, overwrite=True) == d


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_holding_foreign_files_is_refused_even_with_overwrite(tmp_path, overwrite):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "weights").write_text("w")
    (d / "thesis.tex").write_text("years of work")
    with pytest.raises(TransformerError) as e:
        files.check_output_dir(d, "checkpoint", own_checkpoint, overwrite)
    msg = str(e.value)
    assert msg.startswith(f"{d}: is not empty and does not hold a checkpoint")
    assert "'thesis.tex' is not part of one" in msg and "'weights'" in msg
    assert (d / "thesis.tex").read_text() == "years of work"


def test_the_refusal_lists_at_most_three_entries(tmp_path):
    d = tmp_path / "full"
    d.mkdir()
    for name in "abcde":
        (d / name).write_text("")
    with pytest.raises(TransformerError) as e:
        files.check_output_dir(d, "run", own_checkpoint, False)
    assert "it holds 'a', 'b', 'c', ...)" in str(e.value) and "'d'" not in str(e.value).split("it holds")[1]


def test_a_file_is_not_an_output_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(TransformerError, match="exists and is not a directory") as e:
        files.check_output_dir(f, "checkpoint", own_checkpoint, overwrite=True)
    assert str(e.value).startswith(f"{f}: ")


def test_the_current_directory_and_its_parents_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for path in (".", work, tmp_path / "a", tmp_path):
        with pytest.raises(TransformerError, match="is the current directory"):
            files.check_output_dir(path, "checkpoint", lambda p: None, overwrite=True)
    assert files.check_output_dir("sub", "checkpoint", lambda p: None, False) == files.Path("sub")


def test_foreign_entries_describes_the_first_foreign_entry_in_name_order(tmp_path):
    for name in ("weights", "zeta", "alpha"):
        (tmp_path / name).write_text("")
    assert own_checkpoint(tmp_path) == "'alpha' is not part of one"
    (tmp_path / "zeta").unlink()
    (tmp_path / "alpha").unlink()
    assert own_checkpoint(tmp_path) is None


# ----------------------------------------------------------------------------------------------------------
# Whole directories


def test_new_directory_puts_the_complete_directory_in_place(tmp_path):
    d = tmp_path / "ckpt"
    with files.new_directory(d, "checkpoint", own_checkpoint, overwrite=False) as tmp:
        assert tmp.is_dir() and list(tmp.iterdir()) == [] and tmp.parent == tmp_path
        (tmp / "weights").write_text("v1")
        assert not d.exists()  # nothing at the target until the block ends
    assert (d / "weights").read_text() == "v1"
    assert leftovers(tmp_path) == []


def test_new_directory_with_overwrite_replaces_the_old_one_whole(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "weights").write_text("v1")
    (d / "meta.json").write_text("{}")
    with files.new_directory(d, "checkpoint", own_checkpoint, overwrite=True) as tmp:
        (tmp / "weights").write_text("v2")
    assert sorted(p.name for p in d.iterdir()) == ["weights"]  # the old meta.json went with the old directory
    assert (d / "weights").read_text() == "v2"
    assert leftovers(tmp_path) == []


def test_new_directory_leaves_the_old_one_when_the_block_fails(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with files.new_directory(d, "checkpoint", own_checkpoint, overwrite=True) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (d / "weights").read_text() == "v1"
    assert leftovers(tmp_path) == []


def test_new_directory_refuses_foreign_files_before_writing_anything(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    entered = False
    with pytest.raises(TransformerError, match="'notes.txt' is not part of one") as e:
        with files.new_directory(d, "checkpoint", own_checkpoint, overwrite=True):
            entered = True
    assert not entered
    assert str(e.value).startswith(f"{d}: ")
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    assert leftovers(tmp_path) == []


def test_a_replacement_killed_between_its_renames_is_recovered(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "weights").write_text("old")
    new = files.temporary_sibling(d)
    (new / "weights").write_text("new")
    real_replace, calls = os.replace, []

    def killed_after_first(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between moving the old aside and moving the new in
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        files.replace_directory(new, d)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert not d.exists()
    (aside,) = tmp_path.glob(".ckpt.*.old")
    files.recover_directory(d)
    assert (d / "weights").read_text() == "old"
    assert not aside.exists()
    assert new.exists()  # a reader's recovery keeps the leftover; a writer's (clean=True) removes it
    files.recover_directory(d, clean=True)
    assert leftovers(tmp_path) == []
    assert (d / "weights").read_text() == "old"


def test_recover_directory_does_nothing_when_the_directory_is_there(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "weights").write_text("current")
    stale = tmp_path / ".ckpt.12345678.old"
    stale.mkdir()
    files.recover_directory(d)
    assert (d / "weights").read_text() == "current" and stale.exists()
    files.recover_directory(d, clean=True)
    assert not stale.exists() and (d / "weights").read_text() == "current"
    files.recover_directory(tmp_path / "no" / "parent")  # a missing parent is no error


# ----------------------------------------------------------------------------------------------------------
# The cache


def test_cache_root_prefers_transformer_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TRANSFORMER_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("TRANSFORMER_CACHE")
    assert files.cache_root() == tmp_path / "xdg" / "transformer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert files.cache_root() == tmp_path / "home" / ".cache" / "transformer"
    # empty variables count as unset
    monkeypatch.setenv("TRANSFORMER_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert files.cache_root() == tmp_path / "home" / ".cache" / "transformer"


def test_make_private_dirs_makes_every_missing_parent_0700(tmp_path):
    tmp_path.chmod(0o755)
    target = tmp_path / "a" / "b" / "c"
    old = os.umask(0o002)  # a umask under which mkdir(parents=True) would make group-writable parents
    try:
        files.make_private_dirs(target)
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755  # an existing parent is left as it is
    files.make_private_dirs(target)  # already there: no error
