"""transformer.rundir: the run directory's layout, its step checkpoints and reading its recipe back."""

import json

import pytest

from helpers import tiny_run_config
from transformer import rundir
from transformer.errors import CheckpointError, TransformerError


def make_steps(run_dir, *names):
    for name in names:
        (run_dir / "checkpoints" / name).mkdir(parents=True)


def steps(paths):
    return [rundir.step_of(p) for p in paths]


# ----------------------------------------------------------------------------------------------------------
# Step checkpoints


def test_step_dir_and_step_of_are_inverse(tmp_path):
    for n in (0, 9, 10, 1234567, 12345678):
        path = rundir.step_dir(tmp_path, n)
        assert path.parent == tmp_path / "checkpoints"
        assert rundir.step_of(path) == n
    assert rundir.step_dir(tmp_path, 42).name == "step-0000042"


@pytest.mark.parametrize("name", ["step-", "step-x1", "step--1", "steps-12", "best", "step-1.tmp", ".step-3"])
def test_step_of_is_none_for_other_names(tmp_path, name):
    assert rundir.step_of(tmp_path / name) is None


def test_step_checkpoints_are_ordered_by_step_number_not_name(tmp_path):
    # unpadded names sort "step-10" < "step-9" as text; the order must be by number
    make_steps(tmp_path, "step-10", "step-9", "step-100", "step-0000011", "step-abc")
    (tmp_path / "checkpoints" / "step-5").write_text("a file, not a checkpoint")
    assert steps(rundir.step_checkpoints(tmp_path)) == [9, 10, 11, 100]
    assert rundir.step_checkpoints(str(tmp_path)) == rundir.step_checkpoints(tmp_path)  # a str works too


def test_step_checkpoints_of_a_run_without_any(tmp_path):
    assert rundir.step_checkpoints(tmp_path) == []


def test_prune_keeps_the_newest_by_step_number(tmp_path):
    make_steps(tmp_path, "step-8", "step-9", "step-10", "step-11")
    rundir.prune_step_checkpoints(tmp_path, keep=2)
    assert steps(rundir.step_checkpoints(tmp_path)) == [10, 11]
    rundir.prune_step_checkpoints(tmp_path, keep=5)  # fewer than keep: nothing removed
    assert steps(rundir.step_checkpoints(tmp_path)) == [10, 11]


def test_drop_later_steps_removes_only_those_after_the_resumed_step(tmp_path):
    make_steps(tmp_path, "step-90", "step-100", "step-110", "step-1000")
    rundir.drop_later_steps(tmp_path, 100)
    assert steps(rundir.step_checkpoints(tmp_path)) == [90, 100]


def test_average_last_takes_the_last_k_from_the_last_quarter(tmp_path, monkeypatch):
    make_steps(tmp_path, *(f"step-{n}" for n in (100, 600, 700, 800, 900, 1000)))
    calls = []
    monkeypatch.setattr(rundir, "average_checkpoints", lambda paths, out, overwrite: calls.append((paths, out)))
    used = rundir.average_last(tmp_path, k=4, final_step=1000)
    # the last 4 are 700..1000; 700 < 750 is from before the last quarter and is left out
    assert steps(used) == [800, 900, 1000]
    assert calls == [(used, tmp_path / "averaged")]
    rundir.average_last(tmp_path, k=2, final_step=1000, out=tmp_path / "elsewhere")
    assert steps(calls[-1][0]) == [900, 1000] and calls[-1][1] == tmp_path / "elsewhere"


def test_average_last_without_recent_checkpoints_names_the_run(tmp_path, monkeypatch):
    make_steps(tmp_path, "step-100", "step-200")
    monkeypatch.setattr(rundir, "average_checkpoints", lambda *a, **k: pytest.fail("nothing should be averaged"))
    with pytest.raises(TransformerError) as e:
        rundir.average_last(tmp_path, k=2, final_step=1000)
    assert str(e.value).startswith(f"{tmp_path}: no step checkpoints from the last quarter")


# ----------------------------------------------------------------------------------------------------------
# The recipe and the metrics


def test_run_config_round_trips(tmp_path):
    run = tiny_run_config(max_steps=123, seed=7)
    rundir.write_run_config(tmp_path, run)
    back = rundir.read_run_config(tmp_path)
    assert back == run
    assert back.train.max_steps == 123 and back.train.seed == 7
    assert not [p for p in tmp_path.iterdir() if p.name != rundir.CONFIG]  # no temporary file left


def test_cpu_paths_are_stored_but_not_read_back_as_part_of_the_recipe(tmp_path):
    run = tiny_run_config()
    rundir.write_run_config(tmp_path, run, cpu_paths={"train_fp32": "oneDNN"})
    data = json.loads((tmp_path / rundir.CONFIG).read_text(encoding="utf-8"))
    assert data["cpu_paths"] == {"train_fp32": "oneDNN"}
    assert rundir.read_run_config(tmp_path) == run


def test_reading_a_directory_that_is_not_a_run_names_it(tmp_path):
    with pytest.raises(CheckpointError) as e:
        rundir.read_run_config(tmp_path)
    assert str(e.value) == f"{tmp_path / rundir.CONFIG}: missing; {tmp_path} is not a run directory"


def test_a_run_config_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / rundir.CONFIG).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(CheckpointError) as e:
        rundir.read_run_config(tmp_path)
    assert str(e.value) == f"{tmp_path / rundir.CONFIG}: expected a JSON object"


def test_a_run_config_with_an_invalid_value_names_the_file_and_key(tmp_path):
    data = tiny_run_config().to_dict()
    data["train"]["lr"] = -1.0
    (tmp_path / rundir.CONFIG).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError) as e:
        rundir.read_run_config(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / rundir.CONFIG}: ") and "train.lr" in str(e.value)


def test_an_unparsable_run_config_names_the_file(tmp_path):
    (tmp_path / rundir.CONFIG).write_text("{", encoding="utf-8")
    with pytest.raises(CheckpointError, match="unreadable") as e:
        rundir.read_run_config(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / rundir.CONFIG}: ")


def test_append_metrics_adds_one_json_line_each(tmp_path):
    records = [{"step": 100, "val_loss": 1.5}, {"step": 200, "val_loss": 1.25, "note": "ü"}]
    for r in records:
        rundir.append_metrics(tmp_path, r)
    text = (tmp_path / rundir.METRICS).read_text(encoding="utf-8")
    assert text.endswith("\n")
    assert [json.loads(line) for line in text.splitlines()] == records
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.METRICS]


# ----------------------------------------------------------------------------------------------------------
# What a run owns


def test_not_a_run_dir(tmp_path):
    assert rundir.not_a_run_dir(tmp_path) == f"no {rundir.CONFIG}"
    (tmp_path / rundir.CONFIG).mkdir()  # a directory of that name is not a recipe
    assert rundir.not_a_run_dir(tmp_path) == f"no {rundir.CONFIG}"
    (tmp_path / rundir.CONFIG).rmdir()
    rundir.write_run_config(tmp_path, tiny_run_config())
    assert rundir.not_a_run_dir(tmp_path) is None


def test_clear_run_removes_what_a_run_wrote_and_keeps_everything_else(tmp_path):
    rundir.write_run_config(tmp_path, tiny_run_config())
    rundir.append_metrics(tmp_path, {"step": 1})
    for d in ("last", "best", "averaged", ".last.1a2b3c4d.tmp", ".best.1a2b3c4d.old"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "model.safetensors").write_text("")
    make_steps(tmp_path, "step-1")
    (tmp_path / f".{rundir.CONFIG}.1a2b3c4d.tmp").write_text("")
    (tmp_path / f".{rundir.METRICS}.1a2b3c4d.tmp").write_text("")
    kept = ["notes.txt", ".hidden", ".lastly", "lastly", "my_checkpoints"]
    for name in kept:
        (tmp_path / name).write_text("mine")
    rundir.clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
