"""LoRA: adapters equal to peft's (forward and gradients), adapters read and written in peft's layout, merging,
and training in which only the adapters change."""

import json

import pytest
import torch

from helpers import tiny_decoder_dir, tiny_model, tiny_run_config
from transformer import CheckpointError, ConfigError
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.config import LoRAConfig
from transformer.generate import sample
from transformer.interop import from_pretrained
from transformer.interop.peft import export_adapter, load_adapter
from transformer.lora import LoRALinear, apply_lora, merge_lora
from transformer.train import Trainer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5  # fp32: the same products, summed in another order


def randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path, _ = tiny_decoder_dir(tmp_path_factory.mktemp("llama"), "llama", num_key_value_heads=2)
    return path


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def batch(seed=0):
    return torch.randint(8, 300, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("targets", [["q", "v"], ["all-linear"], ["k", "o", "ffn"]])
def test_our_adapters_equal_peft_s_forward_and_gradients(llama, tmp_path, targets):
    ckpt = from_pretrained(llama)
    apply_lora(ckpt.model, LoRAConfig(r=4, alpha=8, targets=targets))
    randomise_adapters(ckpt.model)
    export_adapter(ckpt, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf_model(llama), tmp_path / "adapter", is_trainable=True).eval()
    ids = batch()
    weights = torch.randn(2, 12, 320, generator=torch.Generator().manual_seed(1))
    ours_logits = ckpt.model(ids)
    their_logits = theirs(ids).logits
    assert float((ours_logits - their_logits).detach().abs().max()) < ATOL
    (ours_logits * weights).sum().backward()
    (their_logits * weights).sum().backward()
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if "lora_" in n}
    named = dict(ckpt.model.named_modules())
    compared = 0
    for name, module in named.items():
        if not isinstance(module, LoRALinear):
            continue
        i = name.split(".")[2]
        for part in module.lora_A:
            hf = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                  "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}[part]  # fmt: skip
            for kind in ("lora_A", "lora_B"):
                grad = their_grads[f"base_model.model.model.layers.{i}.{hf}.{kind}.default.weight"]
                ours = getattr(module, kind)[part].grad
                torch.testing.assert_close(ours, grad, rtol=1e-4, atol=1e-5)
                compared += 1
    assert compared == 2 * 2 * len({p for m in named.values() if isinstance(m, LoRALinear) for p in m.lora_A})


def test_an_adapter_trained_with_peft_loads_into_our_model(llama, tmp_path):
    base = hf_model(llama)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                             init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(base, config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(from_pretrained(llama).model, tmp_path / "adapter")
    assert sorted(ours.config.lora.targets) == ["down", "gate", "q", "v"]
    ids = batch(2)
    with torch.no_grad():
        assert float((ours(ids) - theirs(ids).logits).abs().max()) < ATOL


def test_the_adapter_file_holds_only_adapter_tensors(llama, tmp_path):
    from safetensors import safe_open

    ckpt = from_pretrained(llama)
    apply_lora(ckpt.model, LoRAConfig(r=2, targets=["q", "v"]))
    export_adapter(ckpt, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 2


def test_merged_weights_decode_as_the_unmerged_adapter(llama):
    ckpt = from_pretrained(llama)
    apply_lora(ckpt.model, LoRAConfig(r=4, targets=["all-linear"]))
    randomise_adapters(ckpt.model, seed=3)
    prompt = batch(4)[:, :5]
    unmerged = torch.stack(list(sample(ckpt.model, prompt, 16, temperature=0)), 1)
    with torch.no_grad():
        before = ckpt.model(prompt)
    merge_lora(ckpt.model)
    assert ckpt.model.config.lora is None and not any(isinstance(m, LoRALinear) for m in ckpt.model.modules())
    merged = torch.stack(list(sample(ckpt.model, prompt, 16, temperature=0)), 1)
    assert torch.equal(unmerged, merged)
    with torch.no_grad():
        assert float((ckpt.model(prompt) - before).abs().max()) < ATOL


def test_what_peft_cannot_hold_is_refused(llama, tmp_path):
    ckpt = from_pretrained(llama)
    with pytest.raises(CheckpointError, match="has no adapters"):
        export_adapter(ckpt, tmp_path / "a")
    apply_lora(ckpt.model, LoRAConfig(r=2, targets=["q"], train_also=["head"]))
    with pytest.raises(CheckpointError, match="adapters train head too"):
        export_adapter(ckpt, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_adapter(from_pretrained(llama).model, tmp_path / "c")


def test_bad_lora_settings_name_their_field():
    with pytest.raises(ConfigError, match="lora.targets"):
        LoRAConfig(targets=["query"])
    with pytest.raises(ConfigError, match="lora.r"):
        LoRAConfig(r=0)


def lora_run(base_dir, steps=8):
    # steps within the warm-up: the learning rate does not depend on max_steps, so a run split in two matches
    run = tiny_run_config(max_steps=steps, eval_every=1000, eval_bleu_sentences=10, max_tokens=256)
    run.model.init_from = str(base_dir)
    run.train.lora = LoRAConfig(r=2, alpha=4, targets=["all-linear"])
    return run


def test_training_changes_only_the_adapters_and_resumes_exactly(tmp_path, reverse_checkpoint):
    base = load_checkpoint(reverse_checkpoint)
    straight = Trainer(lora_run(reverse_checkpoint), tmp_path / "straight")
    n_state = sum(len(group["params"]) for group in straight.optimizer.param_groups)
    straight.train()
    trained = load_checkpoint(tmp_path / "straight" / "last")
    assert trained.config.lora is not None
    state, base_state = trained.model.state_dict(), base.model.state_dict()
    for name, tensor in state.items():
        if ".lora_" not in name:
            assert torch.equal(tensor, base_state[name]), name  # frozen: bit-identical
    assert any(float(t.abs().max()) > 0 for n, t in state.items() if ".lora_B." in n)  # the adapters learned
    assert n_state == sum(1 for n in state if ".lora_" in n)  # optimizer state for the adapters only
    Trainer(lora_run(reverse_checkpoint, steps=4), tmp_path / "split").train()
    resumed = Trainer(lora_run(reverse_checkpoint), tmp_path / "split", resume=True)
    assert resumed.position.step == 4
    resumed.train()
    again = load_checkpoint(tmp_path / "split" / "last").model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(again[name], tensor), name


def test_a_checkpoint_with_adapters_round_trips(tmp_path):
    model = tiny_model(vocab=12)
    apply_lora(model, LoRAConfig(r=2, targets=["q", "down"]))
    randomise_adapters(model)
    from transformer.tokenizers import CharTokenizer

    tok = CharTokenizer("abcdefgh")
    save_checkpoint(tmp_path / "c", model, "translation", {"src": tok, "tgt": tok})
    back = load_checkpoint(tmp_path / "c")
    assert back.config.lora == model.config.lora
    assert all(torch.equal(a, b) for a, b in zip(back.model.state_dict().values(), model.state_dict().values()))


def test_the_commands_decode_with_an_adapter_as_with_its_merge(llama, tmp_path, capsys):
    from transformer.cli import main

    base = hf_model(llama)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    assert main(["import", str(llama), "--out", str(tmp_path / "ckpt")]) == 0
    assert (
        main(
            ["merge", str(tmp_path / "ckpt"), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]
        )
        == 0
    )
    capsys.readouterr()
    greedy = ["--prompt", "What is", "--temperature", "0", "--max-new-tokens", "8"]
    outputs = []
    for args in (
        ["generate", str(tmp_path / "ckpt"), "--adapter", str(tmp_path / "adapter")],
        ["generate", str(tmp_path / "merged")],
        ["generate", str(tmp_path / "ckpt")],
    ):
        assert main([*args, *greedy]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]  # the adapter decodes as its merge, and changes the model
    assert main(["export", str(tmp_path / "merged"), "--to", "peft", str(tmp_path / "out")]) == 2
    assert "has no adapters" in capsys.readouterr().err


def test_a_lora_classifier_trains_its_new_head_and_resumes_exactly(tmp_path):
    from helpers import tiny_bert_dir
    from transformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from transformer.rundir import read_run_config

    path, _ = tiny_bert_dir(tmp_path / "bert")
    base = from_pretrained(path)
    save_checkpoint(tmp_path / "base", base.model, base.task, base.tokenizers, base.meta)
    lines = ["label\ttext"] + [f"{i % 2}\t{'a big dog runs' if i % 2 else 'the small cat sleeps'}" for i in range(40)]
    for name in ("train", "dev"):
        (tmp_path / f"{name}.tsv").write_text("\n".join(lines) + "\n")

    def run(steps):
        r = RunConfig(
            model=ModelConfig(init_from=str(tmp_path / "base"), dropout=0.0, attention_dropout=0.0, pooling="mean"),
            data=DataConfig(
                task="classification", train_tsv=str(tmp_path / "train.tsv"), val_tsv=str(tmp_path / "dev.tsv")
            ),  # fmt: skip
            train=TrainConfig(
                max_steps=steps,
                batch_size=8,
                lr=1e-2,
                warmup_steps=50,
                eval_every=1000,
                precision="fp32",
                lora=LoRAConfig(r=2, targets=["q", "v"]),
            ),  # fmt: skip
        )
        return r

    straight = Trainer(run(6), tmp_path / "straight")
    straight.train()
    trained = dict(straight.model.named_parameters())
    assert (
        trained["classifier.weight"].requires_grad and not trained["encoder.layers.0.ff.linear1.weight"].requires_grad
    )
    Trainer(run(3), tmp_path / "split").train()
    again = read_run_config(tmp_path / "split")  # what `train --resume` reads: the recipe as it ran
    again.train.max_steps = 6
    resumed = Trainer(again, tmp_path / "split", resume=True)
    assert dict(resumed.model.named_parameters())["classifier.weight"].requires_grad  # the new head trains again
    resumed.train()
    for name, p in resumed.model.state_dict().items():
        assert torch.equal(p, straight.model.state_dict()[name]), name
