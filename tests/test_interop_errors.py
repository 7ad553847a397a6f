"""Importing a broken or hostile Hugging Face directory: every mistake in it is one CheckpointError (or DataError)
line naming the file and the key or entry, never a KeyError/TypeError traceback, a read outside the directory,
or a model built from a config far larger than its weights file."""

import json
import os
import shutil
import time

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the peers are in the dev extra: pip install -e '.[dev]'")

from test_interop import hf_random, marian_tokenizer_files, wordpiece_tokenizer  # noqa: E402

from transformer import CheckpointError, TransformerError  # noqa: E402
from transformer.interop import from_pretrained  # noqa: E402

DELETE = object()  # an edit that removes the key


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny saved model of each family, built once: tests corrupt copies of them."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("bert", "gpt2", "marian")}
    torch.manual_seed(0)
    vocab = wordpiece_tokenizer(dirs["bert"])
    bert = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        num_labels=3,
    )
    hf_random(transformers.BertForSequenceClassification(bert)).save_pretrained(dirs["bert"], safe_serialization=True)
    shutil.copy(dirs["bert"] / "tokenizer.json", dirs["gpt2"] / "tokenizer.json")  # any tokenizer.json will do
    gpt2 = transformers.GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=2, eos_token_id=2
    )
    hf_random(transformers.GPT2LMHeadModel(gpt2)).save_pretrained(dirs["gpt2"], safe_serialization=True)
    V = len(marian_tokenizer_files(dirs["marian"]))
    marian = transformers.MarianConfig(
        vocab_size=V,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
        pad_token_id=V - 1,
        decoder_start_token_id=V - 1,
        eos_token_id=0,
    )
    hf_random(transformers.MarianMTModel(marian)).save_pretrained(dirs["marian"], safe_serialization=True)
    return dirs


@pytest.fixture
def copy(saved, tmp_path):
    def copy(family):
        return shutil.copytree(saved[family], tmp_path / family)

    return copy


def edit_config(path, key, value):
    cfg = json.loads((path / "config.json").read_text())
    if value is DELETE:
        del cfg[key]
    else:
        cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def refused(path, *fragments, error=CheckpointError):
    """Import `path`, expecting one line of the project's error type that contains every fragment."""
    with pytest.raises(error) as info:
        from_pretrained(path)
    message = str(info.value)
    assert isinstance(info.value, TransformerError) and "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


def test_the_saved_models_import(saved):
    for family in saved:
        from_pretrained(saved[family])  # the corruptions below are what breaks them


# ----------------------------------------------------------------------------------------------------------
# 1. Malformed configs and files

CORRUPTIONS = [
    ("bert", "hidden_size", DELETE),
    ("bert", "hidden_size", "big"),
    ("bert", "num_hidden_layers", [2]),
    ("bert", "vocab_size", None),
    ("bert", "intermediate_size", 0),
    ("bert", "num_attention_heads", True),
    ("bert", "num_attention_heads", 5),
    ("bert", "hidden_dropout_prob", "0.1"),
    ("bert", "hidden_dropout_prob", 1.5),
    ("bert", "hidden_act", ["gelu"]),
    ("bert", "is_decoder", "no"),
    ("bert", "architectures", "BertModel"),
    ("bert", "id2label", ["a", "b", "c"]),
    ("bert", "id2label", {"0": "a", "5": "b"}),
    ("bert", "id2label", {}),
    ("bert", "pad_token_id", -1),
    ("bert", "position_embedding_type", {"kind": "absolute"}),
    ("bert", "model_type", DELETE),
    ("bert", "model_type", ["bert"]),
    ("gpt2", "n_embd", DELETE),
    ("gpt2", "n_embd", "big"),
    ("gpt2", "n_layer", 2.0),
    ("gpt2", "n_head", None),
    ("gpt2", "vocab_size", -3),
    ("gpt2", "eos_token_id", []),
    ("gpt2", "eos_token_id", "x"),
    ("gpt2", "bos_token_id", 10**6),
    ("gpt2", "n_inner", "wide"),
    ("gpt2", "activation_function", 3),
    ("gpt2", "scale_attn_weights", "false"),
    ("gpt2", "layer_norm_epsilon", [1e-5]),
    ("marian", "d_model", DELETE),
    ("marian", "d_model", "big"),
    ("marian", "encoder_layers", [2]),
    ("marian", "decoder_ffn_dim", None),
    ("marian", "eos_token_id", []),
    ("marian", "pad_token_id", 10**6),
    ("marian", "share_encoder_decoder_embeddings", "yes"),
    ("marian", "decoder_vocab_size", "x"),
    ("marian", "scale_embedding", 1),
    ("marian", "dropout", {"p": 0.1}),
]


@pytest.mark.parametrize("family, key, value", CORRUPTIONS, ids=lambda v: "del" if v is DELETE else repr(v)[:20])
def test_a_malformed_config_value_is_named_with_its_file(copy, family, key, value):
    path = copy(family)
    edit_config(path, key, value)
    refused(path, path / "config.json", key)


def test_a_wrong_value_reads_as_the_file_shows_it(copy):
    path = copy("bert")
    edit_config(path, "hidden_size", "big")
    assert refused(path) == f"{path / 'config.json'}: key 'hidden_size' must be an integer, got 'big'"
    edit_config(path, "hidden_size", None)
    assert refused(path).endswith("key 'hidden_size' must be an integer, got null")


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"bert"', "{not json", ""])
def test_a_config_that_is_not_a_json_object_is_named(copy, text):
    path = copy("gpt2")
    (path / "config.json").write_text(text)
    refused(path, path / "config.json")


def test_an_unknown_model_type_is_named(copy):
    path = copy("gpt2")
    edit_config(path, "model_type", "bloom")
    refused(path, path / "config.json", "model_type='bloom' is not supported")


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_missing_or_corrupt_weights_file_is_named(copy, family):
    path = copy(family)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    refused(path, weights, "corrupt or truncated")
    weights.write_bytes(b"\x00" * 64)  # garbage
    refused(path, weights, "corrupt or truncated")
    weights.unlink()
    refused(path, "no model.safetensors")


def test_missing_or_unreadable_tokenizer_files_are_named(copy):
    path = copy("bert")
    (path / "tokenizer.json").write_text("{broken")
    refused(path, path / "tokenizer.json", error=TransformerError)
    (path / "tokenizer.json").unlink()
    refused(path, path / "tokenizer.json", "missing")


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("source.spm", None, "missing"),
        ("target.spm", b"not a sentencepiece model", "not a SentencePiece model"),
        ("vocab.json", None, "missing"),
        ("vocab.json", b"[1, 2]", "must be a JSON object"),
        ("vocab.json", b'{"</s>": 0, "<unk>": "one"}', "entry '<unk>' must be a token id"),
        ("vocab.json", b'{"<unk>": 1}', "entry '</s>' is missing"),
    ],
)
def test_a_broken_marian_tokenizer_file_is_named(copy, name, content, fragment):
    path = copy("marian")
    if content is None:
        (path / name).unlink()
    else:
        (path / name).write_bytes(content)
    refused(path, path / name, fragment)


@pytest.mark.parametrize(
    "family, name",
    [
        ("bert", "config.json"),
        ("bert", "model.safetensors"),
        ("bert", "tokenizer.json"),
        ("marian", "vocab.json"),
        ("marian", "source.spm"),
    ],
)
def test_a_file_that_cannot_be_read_is_named(copy, family, name):
    """A directory where a file should be: every reader's open fails with an OSError (as for permission denied,
    which cannot be set up for a test run as root)."""
    path = copy(family)
    (path / name).unlink()
    (path / name).mkdir()
    refused(path, path / name, error=TransformerError)


@pytest.mark.parametrize("name", ["config.json", "vocab.json", "source.spm"])
def test_permission_denied_is_named(copy, monkeypatch, name):
    path = copy("marian")
    if os.geteuid() != 0:
        (path / name).chmod(0)
    else:  # root reads any file: deny it where Python opens it
        real_open = open

        def deny(file, *args, **kwargs):
            if str(file) == str(path / name):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", deny)
        monkeypatch.setattr("io.open", deny)
    refused(path, path / name, "Permission denied")


def test_the_cli_reports_a_malformed_config_in_one_line(copy, tmp_path, capsys):
    from transformer.cli import main

    path = copy("bert")
    edit_config(path, "hidden_size", [32])
    assert main(["import", str(path), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"transformer: error: {path / 'config.json'}: key 'hidden_size' must be an integer, got [32]"


# ----------------------------------------------------------------------------------------------------------
# 2. Path names in a directory's metadata stay inside it


def sentence_transformers_files(path, pooling_path="1_Pooling"):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": pooling_path, "type": "sentence_transformers.models.Pooling"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))


def pooling_config(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))


def test_a_pooling_module_inside_the_directory_is_read(copy):
    path = copy("bert")
    sentence_transformers_files(path)
    pooling_config(path / "1_Pooling")
    assert from_pretrained(path).config.pooling == "mean"


@pytest.mark.parametrize("escape", ["../elsewhere", "/etc", "1_Pooling/../../elsewhere", "link"])
def test_a_module_path_outside_the_directory_is_refused(copy, tmp_path, escape):
    path = copy("bert")
    pooling_config(tmp_path / "elsewhere")  # a readable pooling config outside: it must not be read
    (path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    sentence_transformers_files(path, escape)
    refused(path, path / "modules.json", 'module 1\'s "path"', repr(escape), "points outside")


@pytest.mark.parametrize(
    "modules",
    [
        {"path": ""},
        [["Transformer", ""]],
        [{"type": 3, "path": ""}],
        [{"type": "sentence_transformers.models.Pooling", "path": 7}],
    ],
)
def test_a_malformed_modules_json_is_named(copy, modules):
    path = copy("bert")
    (path / "modules.json").write_text(json.dumps(modules))
    refused(path, path / "modules.json")


# ----------------------------------------------------------------------------------------------------------
# 3. A config far larger than its weights is refused before any model is built (in well under a second: the
# time limits below leave room for a busy machine; building any of these models takes far longer, or all memory)


@pytest.mark.parametrize(
    "family, key, value, tensor, held, implied",
    [
        ("bert", "hidden_size", 100_000, "bert.embeddings.word_embeddings.weight", (13, 32), (13, 100_000)),
        ("bert", "vocab_size", 10**9, "bert.embeddings.word_embeddings.weight", (13, 32), (10**9, 32)),
        ("bert", "intermediate_size", 10**7, "bert.encoder.layer.0.intermediate.dense.weight", (48, 32), (10**7, 32)),
        ("bert", "max_position_embeddings", 10**8, "bert.embeddings.position_embeddings.weight", (40, 32), (10**8, 32)),
        ("gpt2", "n_embd", 100_000, "transformer.wte.weight", (13, 32), (13, 100_000)),
        ("marian", "d_model", 100_000, "model.encoder.embed_tokens.weight", None, None),
    ],
)
def test_a_huge_config_is_refused_by_shape_before_building(copy, family, key, value, tensor, held, implied):
    path = copy(family)
    edit_config(path, key, value)
    start = time.perf_counter()
    shapes = () if held is None else (held, implied)
    message = refused(path, f"tensor '{tensor}'", f"{key}={value}", path / "config.json", *shapes)
    assert time.perf_counter() - start < 2.0, message


@pytest.mark.parametrize(
    "family, key",
    [("bert", "num_hidden_layers"), ("gpt2", "n_layer"), ("marian", "encoder_layers"), ("marian", "decoder_layers")],
)
def test_a_config_with_more_layers_than_its_weights_is_refused_before_building(copy, family, key):
    path = copy(family)
    edit_config(path, key, 10_000)
    start = time.perf_counter()
    refused(path, path / "config.json", f"key '{key}' is 10000", "holds 2 such layers")
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "family, name, shape",
    [
        ("bert", "bert.encoder.layer.1.attention.self.key.weight", (32, 8)),
        ("gpt2", "transformer.h.1.attn.c_attn.weight", (32, 96, 1)),
    ],
)
def test_tensors_that_disagree_with_each_other_are_refused_by_name(copy, family, name, shape):
    from safetensors.torch import load_file, save_file

    path = copy(family)
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name] = torch.zeros(shape)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    refused(path, path / "model.safetensors", f"'{name}' {shape}")


def test_a_pooling_flag_that_is_not_a_boolean_is_named(copy):
    path = copy("bert")
    sentence_transformers_files(path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": "yes"}))
    refused(path, path / "1_Pooling" / "config.json", "'pooling_mode_mean_tokens'")
