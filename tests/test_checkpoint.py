import json

import pytest
import torch

from helpers import tiny_model
from transformer import CheckpointError, TransformerError
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.tokenizers import CharTokenizer


def model_and_tok(**kw):
    return tiny_model(vocab=30, **{"tie_embeddings": "all", **kw}), CharTokenizer("abcdefghijklmnopqrstuvwxyz")


def save(tmp_path, **kw):
    model, tok = model_and_tok(**kw)
    path = save_checkpoint(tmp_path / "ckpt", model, "translation", {"src": tok, "tgt": tok})
    return path, model


def test_round_trip_gives_the_same_model(tmp_path):
    path, model = save(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    ckpt = load_checkpoint(path)
    src, tgt = torch.randint(4, 30, (2, 5)), torch.randint(4, 30, (2, 4))
    torch.testing.assert_close(ckpt.model(src, tgt), model(src, tgt), rtol=0, atol=0)
    assert ckpt.model.output.weight is ckpt.model.encoder.embed.weight  # tying survives
    assert ckpt.src_tokenizer.encode("abc") == [4, 5, 6]


def test_overwrite_replaces_atomically(tmp_path):
    path, _ = save(tmp_path)
    model, tok = model_and_tok(d_model=32)
    with pytest.raises(TransformerError, match="already holds a checkpoint; --overwrite replaces it"):
        save_checkpoint(path, model, "translation", {"src": tok, "tgt": tok})
    assert load_checkpoint(path).config.d_model == 16
    save_checkpoint(path, model, "translation", {"src": tok, "tgt": tok}, overwrite=True)
    assert load_checkpoint(path).config.d_model == 32
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path, _ = save(tmp_path)
    model, tok = model_and_tok(d_model=32)
    import safetensors.torch

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(path, model, "translation", {"src": tok, "tgt": tok}, overwrite=True)
    assert load_checkpoint(path).config.d_model == 16
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_missing_directory_and_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: checkpoint directory not found"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_checkpoint(tmp_path / "empty")


def test_corrupt_files_name_the_file(tmp_path):
    path, _ = save(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: unreadable"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps(cfg))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_checkpoint(path)


def _rewrite_weights(path, weights):
    """Replace a checkpoint's weights and record their checksum, as a writer of wrong weights would."""
    from safetensors.torch import save_file

    from transformer.checkpoint import file_sha256

    save_file(weights, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "weights_sha256": file_sha256(path / "model.safetensors")}))


def test_missing_tensor_and_shape_mismatch(tmp_path):
    from safetensors.torch import load_file

    path, _ = save(tmp_path)
    weights = load_file(str(path / "model.safetensors"))
    name = "decoder.layers.0.ff.linear1.weight"
    _rewrite_weights(path, {k: v for k, v in weights.items() if k != name})
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        load_checkpoint(path)
    weights[name] = torch.zeros(3, 3)
    _rewrite_weights(path, weights)
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \(3, 3\)"):
        load_checkpoint(path)


def test_tampered_weights_are_refused(tmp_path):
    """A weights file changed after saving, still a valid file of the right tensors, is caught by its checksum."""
    from safetensors.torch import load_file, save_file

    path, _ = save(tmp_path)
    weights = load_file(str(path / "model.safetensors"))
    name = "decoder.layers.0.ff.linear1.weight"
    weights[name][0, 0] += 1.0
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors: the file differs from the one saved"):
        load_checkpoint(path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["weights_sha256"]  # a checkpoint from before checksums: loads as before
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(path).model.state_dict()[name][0, 0] == weights[name][0, 0]


def test_task_mismatch(tmp_path):
    path, _ = save(tmp_path)
    with pytest.raises(CheckpointError, match="'translation' checkpoint, but this command needs a 'lm'"):
        load_checkpoint(path, task="lm")
