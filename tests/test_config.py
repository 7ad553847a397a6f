import pytest

from transformer import ConfigError
from transformer.config import load_run_config

GOOD = """
model:
  d_model: 64
  n_heads: 4
data:
  task: translation
  train_src: a.en
train:
  lr: 1.0e-3
  betas: [0.9, 0.98]
"""


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_loads_and_overrides(tmp_path):
    run = load_run_config(write(tmp_path, GOOD), ["train.lr=5e-4", "model.norm_first=true", "train.max_steps=10"])
    assert run.model.d_model == 64 and run.model.norm_first is True
    assert run.train.lr == 5e-4 and run.train.betas == (0.9, 0.98) and run.train.max_steps == 10


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  d_modle: 64\n", r"unknown key 'model.d_modle' \(did you mean 'model.d_model'\?\)"),
        ("trian:\n  lr: 1\n", r"unknown key 'trian' \(did you mean 'train'\?\)"),
        ("model:\n  d_model: sixty\n", r"model.d_model='sixty': expected an integer"),
        ("train:\n  bf16: 1\n", r"train.bf16=1: expected true or false"),
        ("model:\n  norm_first: 1\n", r"model.norm_first=1: expected true or false"),
        ("train:\n  precision: fp16\n", r"precision='fp16': must be one of 'auto', 'fp32', 'bf16'"),
        ("train:\n  device: gpu\n", r"train.device='gpu': must be auto, cpu, cuda or cuda:N"),
        ("train:\n  lr: -1\n", r"train.lr=-1.0: must be > 0"),
        ("model:\n  activation: tanh\n", r"activation='tanh': must be one of 'relu', 'gelu'"),
        ("model: [1, 2\n", r"cfg.yaml:\d+: invalid YAML"),
        ("- just\n- a list\n", r"expected a mapping"),
        ("model:\n  d_model: 30\n  n_heads: 4\n", r"d_model=30: must be divisible by n_heads=4"),
    ],
)
def test_bad_configs_name_the_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_run_config(write(tmp_path, text))
    assert str(e.value).startswith(str(tmp_path / "cfg.yaml"))


@pytest.mark.parametrize("old, new", [("true", "bf16"), ("false", "fp32")])
def test_older_bf16_key_reads_as_precision(tmp_path, old, new):
    assert load_run_config(write(tmp_path, f"train:\n  bf16: {old}\n")).train.precision == new


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_run_config(tmp_path / "nope.yaml")


def test_ready_made_recipes_load():
    from pathlib import Path

    recipes = {p.stem: load_run_config(p) for p in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))}
    assert {"multi30k-en-de", "shakespeare-char"} <= set(recipes)
    m30k, lm = recipes["multi30k-en-de"], recipes["shakespeare-char"]
    assert m30k.data.task == "translation" and m30k.train.precision == "auto" and m30k.train.average_last == 3
    assert lm.model.arch == "decoder-only" and lm.data.task == "lm"
    # the Multi30k recipe's fp32 variant (CPUs without native bf16) replaces exactly what it names
    fp32, bf16 = m30k.for_precision("fp32"), m30k.for_precision("bf16")
    assert fp32.train.max_tokens == 2048 and fp32.train.warmup_steps == 300 and fp32.model.dropout == 0.2
    assert bf16.train.max_tokens == 4096 and bf16.train.warmup_steps == 800 and bf16.model.dropout == 0.3
    assert fp32.train.precision == "fp32" and bf16.train.precision == "bf16" and fp32.fp32_variant is None
    assert fp32.model.attention_dropout == bf16.model.attention_dropout == 0.1


def test_a_bad_variant_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"fp32_variant: .*unknown key 'train.warmup'"):
        load_run_config(write(tmp_path, "fp32_variant:\n  train: {warmup: 3}\n"))
