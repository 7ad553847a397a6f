"""Helpers the tests import (fixtures live in conftest.py)."""

import os
import shutil

import pytest
import torch

FP32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7


# words the reverse-task fixture (conftest's reverse_run) is asked to reverse in the tests of decoding and serving
REVERSE_WORDS = ["abc", "hello", "zyxwvut", "q", "transfor", "mmmm", "ab", "qwertyui"]


def fp32_atol(reference: torch.Tensor, depth: int) -> float:
    """Absolute tolerance for two fp32 evaluations of one function that differ only in the order of their sums
    (another kernel; padding, batching or a cache that changes how a product is blocked; another BLAS on
    another CPU). A sum of K terms carries about sqrt(K) units of rounding (eps) relative to the values summed,
    so with K <= 64, as in the tests' models, each of `depth` chained reductions (a matrix product, a softmax, a
    LayerNorm) may add 8 eps times the largest value. A real bug (a pad attended to, a position shifted) moves
    values by orders of magnitude more."""
    return 8 * depth * FP32_EPS * max(1.0, float(reference.detach().abs().max()))


def model_depth(cfg) -> int:
    """Chained reductions from input to logits: attention (2 products, a softmax), the feed-forward's two
    products and a LayerNorm per sublayer, about 4 per sublayer, plus the output layer."""
    sublayers = 2 * cfg.n_encoder_layers + 3 * cfg.n_decoder_layers
    return 4 * sublayers + 1


def tiny_run_config(**train_kw):
    """A small built-in-task recipe that trains in seconds."""
    from transformer import DataConfig, ModelConfig, RunConfig, TrainConfig

    # fp32: the tests' expectations do not depend on whether this CPU has native bf16
    train = dict(
        max_tokens=1024,
        lr=3e-3,
        warmup_steps=50,
        schedule="cosine",
        max_steps=400,
        eval_every=400,
        label_smoothing=0.0,
        eval_bleu_sentences=100,
        log_every=50,
        precision="fp32",
    )
    train.update(train_kw)
    return RunConfig(
        model=ModelConfig(
            d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=128, dropout=0.0, tie_embeddings="all"
        ),
        data=DataConfig(
            task="synthetic",
            synthetic_task="reverse",
            synthetic_max_len=8,
            synthetic_train_size=5000,
            synthetic_val_size=100,
        ),
        train=TrainConfig(**train),
    )


def tiny_config(arch: str = "encoder-decoder", vocab: int = 0, **overrides):
    """The tests' tiny ModelConfig: d_model 16, 2 heads, one layer per stack, d_ff 16, every other field at
    its default; `vocab` sets the vocabulary sizes (both for an encoder-decoder, the target's for a decoder-only
    model, the source's for an encoder-only one; 0: left for training to set). `overrides` replace any field."""
    from transformer import ModelConfig

    base = dict(d_model=16, n_heads=2, d_ff=16, arch=arch)
    if arch != "decoder-only":
        base["n_encoder_layers"] = 1
    if arch != "encoder-only":
        base["n_decoder_layers"] = 1
    if vocab:
        if arch != "decoder-only":
            base["src_vocab_size"] = vocab
        if arch != "encoder-only":
            base["tgt_vocab_size"] = vocab
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(arch: str = "encoder-decoder", seed=0, vocab: int = 0, **overrides):
    """The model `tiny_config(arch, vocab, **overrides)` describes (Transformer, TransformerLM or
    TransformerEncoder), in eval mode, its weights drawn right after `torch.manual_seed(seed)`: the same seed
    and sizes give the same weights. seed=None draws from the global generator as it stands."""
    from transformer.model import build_model

    cfg = tiny_config(arch, vocab, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return build_model(cfg).eval()


def tiny_bert_dir(path, num_labels: int = 0, seed: int = 0):
    """A small BERT saved by Hugging Face transformers (random weights) with a WordPiece tokenizer.json that
    lower-cases and adds [CLS] ... [SEP]: what `transformer import` reads. Returns (path, the transformers model)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "dog",
        "cat",
        "runs",
        "the",
        "big",
        "##s",
        ".",
        "sleeps",
        "small",
        "bird",
        "sings",
    ]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        num_labels=max(num_labels, 2),
    )
    torch.manual_seed(seed)
    kind = transformers.BertForSequenceClassification if num_labels else transformers.BertModel
    model = kind(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path, model


# Chat templates of the two kinds the families ship, written for the tests: Llama 3's headers and ChatML (Qwen's)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = """{%- if messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
DECODER_SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip


def decoder_tokenizer(add_bos: bool):
    """A small byte-level BPE `tokenizers.Tokenizer` with the chat templates' special tokens (ids 0-7), trained
    on a few sentences; `add_bos` puts <s> before each text, as Llama's tokenizers do (Qwen's add nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["You are a helpful assistant.", "What is two plus two?", "Write a function that adds two numbers."] * 5
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=DECODER_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(text, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def tiny_decoder_dir(path, family: str = "llama", seed: int = 0, chat: str = "", **overrides):
    """A small decoder-only model of a Hugging Face family ("llama", "qwen2", "qwen3", "mistral", "gemma",
    "phi3"), random weights (std 0.2, so that logits differ enough to test), saved by `transformers` with a
    byte-level BPE tokenizer.json, and `chat` ("llama3" or "chatml") a chat template in tokenizer_config.json.
    `overrides` replace config keys. Returns (path, the transformers model in eval mode)."""
    import json

    import torch
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
        "gemma": transformers.GemmaConfig,
        "phi3": transformers.Phi3Config,
    }
    keys = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, tie_word_embeddings=family == "gemma", head_dim=8)  # fmt: skip
    keys.update(overrides)
    cfg = classes[family](**keys)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    decoder_tokenizer(add_bos=family in ("llama", "mistral", "gemma")).save(str(path / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "pad_token": "<pad>"}  # fmt: skip
    if chat:
        tok_cfg["chat_template"] = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE}[chat]
        tok_cfg["eos_token"] = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}[chat]
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return path, model


# headless Chromium with nothing of its own that reaches the network
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_or_skip():
    """Playwright's sync API and Debian's chromium, or a skip saying what is missing (a failure under CI=true,
    where .ci/run installs it)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs Debian's chromium (.ci/run): the browser test must run there")
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    return sync_api, chromium


def free_port() -> int:
    """A loopback port nobody listens on now (for a server the test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, *flags):
    """`transformer serve CHECKPOINT --port P --device cpu FLAGS` as a process, once it answers /health.
    Returns (its URL, the process); the caller kills it."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "transformer", "serve", str(checkpoint), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen([*cmd, *flags], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read()}")
