"""Chat templates rendered as transformers renders them, and chat sessions that keep their cache across turns."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from helpers import tiny_decoder_dir
from transformer import TransformerError
from transformer.chat import ChatSession, render_chat
from transformer.checkpoint import save_checkpoint
from transformer.generate import SamplingSettings, sample
from transformer.interop import from_pretrained

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus two?"}],
    [
        {"role": "system", "content": "You are terse. Ünïcödé is fine."},
        {"role": "user", "content": "  Write a function that adds two numbers.  "},
        {"role": "assistant", "content": "def add(a, b): return a + b"},
        {"role": "user", "content": "And <b>three</b>?"},
    ],
]


@pytest.fixture(scope="module", params=[("llama", "llama3"), ("qwen2", "chatml")], ids=["llama3", "chatml"])
def chat_model(request, tmp_path_factory):
    family, template = request.param
    path, _ = tiny_decoder_dir(tmp_path_factory.mktemp(template), family, chat=template)
    return path, from_pretrained(path)


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one", "four"])
def test_the_template_gives_transformers_text_and_ids(chat_model, messages, generation_prompt):
    path, ckpt = chat_model
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    chat = ckpt.meta["chat"]
    text = render_chat(chat["template"], messages, generation_prompt, chat["special_tokens"])
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ckpt.tgt_tokenizer.encode_plain(text) == list(ids)


def test_a_template_s_own_refusal_is_a_clear_error(chat_model):
    _, ckpt = chat_model
    if "raise_exception" not in ckpt.meta["chat"]["template"]:
        pytest.skip("this template refuses nothing")
    with pytest.raises(TransformerError, match="chat template refused these messages: unknown role tool"):
        render_chat(ckpt.meta["chat"]["template"], [{"role": "tool", "content": "x"}], True, {})


def greedy_reply(ckpt, ids, n):
    prompt = torch.tensor([ids])
    return [int(t) for t in sample(ckpt.model, prompt, n, temperature=0)]


def test_a_second_turn_reuses_the_cache_and_replies_as_a_fresh_read_would(chat_model):
    _, ckpt = chat_model
    settings = SamplingSettings(max_new_tokens=6, temperature=0)
    with ChatSession(ckpt.model, ckpt.tgt_tokenizer, ckpt.meta["chat"], settings=settings) as session:
        "".join(session.reply("What is two plus two?"))
        first_prompt = session.last_prompt
        "".join(session.reply("And three?"))
    assert session.reused >= len(first_prompt)  # the first turn was not read again
    assert session.last_prompt[: len(first_prompt)] == first_prompt
    assert session.last_reply == greedy_reply(ckpt, session.last_prompt, len(session.last_reply))
    assert len(session.last_reply) == 6  # random weights: no end-of-turn token came


def test_a_reply_stops_at_any_end_of_turn_id(chat_model):
    _, ckpt = chat_model
    settings = SamplingSettings(max_new_tokens=8, temperature=0)
    with ChatSession(ckpt.model, ckpt.tgt_tokenizer, ckpt.meta["chat"], settings=settings) as session:
        "".join(session.reply("hi"))
    tokens = session.last_reply
    model = ckpt.model
    model.config = dataclasses.replace(model.config, extra_eos_ids=[tokens[2]])
    try:
        with ChatSession(model, ckpt.tgt_tokenizer, ckpt.meta["chat"], settings=settings) as session:
            "".join(session.reply("hi"))
        assert session.last_reply == tokens[: tokens.index(tokens[2])]
    finally:
        model.config = ckpt.config


def test_without_a_template_chat_says_what_to_do_instead(tmp_path):
    path, _ = tiny_decoder_dir(tmp_path, "llama")
    ckpt = from_pretrained(path)
    with pytest.raises(TransformerError, match="no chat template.*transformer generate"):
        ChatSession(ckpt.model, ckpt.tgt_tokenizer, ckpt.meta.get("chat") or {})


def test_chat_and_generate_chat_commands(chat_model, tmp_path):
    _, ckpt = chat_model
    save_checkpoint(tmp_path / "ckpt", ckpt.model, ckpt.task, ckpt.tokenizers, ckpt.meta)
    run = [sys.executable, "-m", "transformer"]
    greedy = ["--temperature", "0", "--max-new-tokens", "5"]
    one = subprocess.run(
        [*run, "generate", str(tmp_path / "ckpt"), "--chat", "What is two plus two?", *greedy],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    lines = "What is two plus two?\nAnd three?\n/reset\nWhat is two plus two?\n"
    session = subprocess.run(
        [*run, "chat", str(tmp_path / "ckpt"), *greedy], input=lines, capture_output=True, text=True, timeout=300
    )
    assert session.returncode == 0, session.stderr
    replies = session.stdout.split("\n")
    # the first turn, and the first turn again after /reset, are the one-shot reply
    assert replies[0] == one.stdout.rstrip("\n") == replies[2]
