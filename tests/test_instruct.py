"""Instruction tuning (task causal-lm): JSONL records read strictly, the loss on responses only, examples packed
without attending across each other, and a LoRA run on a pretrained model's chat template that learns."""

import json

import pytest
import torch

from helpers import fp32_atol, tiny_decoder_dir, tiny_model
from transformer import DataError
from transformer.batching import pack_examples
from transformer.checkpoint import save_checkpoint
from transformer.config import DataConfig, LoRAConfig, RunConfig, TrainConfig
from transformer.data import read_instructions
from transformer.interop import from_pretrained
from transformer.tasks import encode_instruction
from transformer.train import Trainer


@pytest.mark.parametrize(
    "line, needle",
    [
        ("{not json", "not a JSON object"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "a"}', 'needs "prompt" and "response"'),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "at least one assistant message"),
        ('{"messages": [{"role": "assistant"}]}', '"messages" must be a list'),
    ],
)
def test_a_bad_record_names_its_file_and_line(tmp_path, line, needle):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=f"{path}:3: .*{needle}"):
        read_instructions(path)


def test_packed_examples_see_only_themselves():
    model = tiny_model("decoder-only", vocab=40, d_model=32, d_ff=48, n_decoder_layers=2, positional="rope",
                       norm="rmsnorm", feed_forward="gated", activation="silu", norm_first=True)  # fmt: skip
    examples = [torch.randint(4, 40, (n,)).tolist() for n in (5, 7, 4)]
    x, y, counts, segments = pack_examples([(e, [True] * len(e)) for e in examples], block=16, pad=0)
    assert x.shape == (1, 16) and segments[0].tolist() == [0] * 4 + [1] * 6 + [2] * 3 + [-1] * 3
    with torch.no_grad():
        packed = model(x, segments=segments)[0]
        start = 0
        for e in examples:
            alone = model(torch.tensor([e[:-1]]))[0]
            torch.testing.assert_close(packed[start : start + len(e) - 1], alone, rtol=0, atol=fp32_atol(alone, 12))
            start += len(e) - 1
    assert counts[0, 13:].sum() == 0 and y[0, :4].tolist() == examples[0][1:]


def test_the_loss_counts_response_tokens_only():
    model = tiny_model("decoder-only", vocab=40, d_model=32, d_ff=48)
    ids = torch.randint(4, 40, (2, 9))
    targets = torch.randint(4, 40, (2, 9))
    counts = torch.zeros(2, 9, dtype=torch.bool)
    counts[:, 5:] = True
    with torch.no_grad():
        logits = model(ids)
        expected = torch.nn.functional.cross_entropy(logits[counts], targets[counts])
        assert float(model.loss(ids, targets, counts=counts)) == pytest.approx(float(expected), rel=1e-5)
        changed = targets.clone()
        changed[:, :5] = 4  # the prompt's targets do not count
        assert float(model.loss(ids, changed, counts=counts)) == pytest.approx(float(expected), rel=1e-5)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path, _ = tiny_decoder_dir(tmp_path_factory.mktemp("qwen"), "qwen2", chat="chatml")
    return from_pretrained(path)


def test_a_chat_record_counts_the_assistant_turns(chat_model):
    tok, chat = chat_model.tgt_tokenizer, chat_model.meta["chat"]
    record = {"messages": [{"role": "user", "content": "What is two plus two?"},
                           {"role": "assistant", "content": "Four."},
                           {"role": "user", "content": "And three?"},
                           {"role": "assistant", "content": "Six."}]}  # fmt: skip
    ids, counted = encode_instruction(record, tok, chat, 2, "x:1")
    spans = "".join(tok.decode([i]) if c else "|" for i, c in zip(ids, counted)).split("|")
    assert [s for s in spans if s] == ["Four.\n", "Six.\n"]  # each reply and the end of its turn
    prompt_ids, prompt_counted = encode_instruction({"prompt": "Q: 2+2", "response": " 4"}, tok, chat, 2, "x:2")
    assert prompt_counted.count(True) == len(tok.encode_plain(" 4")) + 1 and prompt_ids[-1] == 2


def test_lora_instruction_tuning_learns_the_responses(chat_model, tmp_path):
    save_checkpoint(tmp_path / "base", chat_model.model, chat_model.task, chat_model.tokenizers, chat_model.meta)
    facts = [("What is two plus two?", "Four."), ("What is one plus one?", "Two."), ("Name a color.", "Red.")]
    for name in ("train", "val"):
        lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                 for q, a in facts] * (4 if name == "train" else 1)  # fmt: skip
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    run = RunConfig(
        data=DataConfig(
            task="causal-lm",
            train_jsonl=str(tmp_path / "train.jsonl"),
            val_jsonl=str(tmp_path / "val.jsonl"),
            block_size=256,
        ),  # fmt: skip
        train=TrainConfig(
            max_steps=60,
            batch_size=4,
            lr=3e-2,
            warmup_steps=5,
            eval_every=60,
            label_smoothing=0.0,
            schedule="constant",
            precision="fp32",
            lora=LoRAConfig(r=8, alpha=16, targets=["all-linear"]),
        ),  # fmt: skip
    )
    run.model.init_from = str(tmp_path / "base")
    trainer = Trainer(run, tmp_path / "run")
    before = trainer.task.validate(trainer.model)["val_loss"]
    after = trainer.train()["val_loss"]
    # random weights near the uniform loss (log 320 = 5.77); a rank-8 update of a 32-wide model moves it clearly
    assert after < 0.85 * before


def test_without_files_the_built_in_task_gives_the_instructions(tmp_path):
    from transformer.tasks import build_task
    from transformer.tokenizers import CharTokenizer

    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz :\n")
    model = tiny_model("decoder-only", vocab=tok.vocab_size)
    save_checkpoint(tmp_path / "base", model, "lm", {"tgt": tok})
    run = RunConfig(data=DataConfig(task="causal-lm", synthetic_train_size=20, synthetic_val_size=5, block_size=64))
    run.model.init_from = str(tmp_path / "base")
    task = build_task(run, {"tgt": tok})
    _, y, counts, _ = task.train
    # what counts is the reversed letters and one end token per example, never the prompt "reverse: ...\n"
    assert set(y[counts].tolist()) <= set(tok.encode("abcdefghijklmnopqrstuvwxyz")) | {2}
    assert int((y[counts] == 2).sum()) == 20
    one_file = RunConfig(data=DataConfig(task="causal-lm", train_jsonl=str(tmp_path / "t.jsonl")))
    one_file.model.init_from = str(tmp_path / "base")
    with pytest.raises(DataError, match="needs both data.train_jsonl and data.val_jsonl"):
        build_task(one_file, {"tgt": tok})
