"""Decoding a Llama-shaped language model: ours against `transformers`' `generate()` on the same random weights.

The model is the issue's shape (12 layers, d_model 768, 12 query heads sharing 4 key/value heads, SwiGLU with
d_ff 2048, RoPE, untied output over a 32k vocabulary). Hugging Face builds it, saves it, and this package imports
that directory, so both hold the same weights. Each contender reads a (batch, 128) prompt and writes 32 tokens,
greedily, with no end token (transformers' generation_config.eos_token_id is unset, `sample` never stops early):

- prefill: `sample(..., 1)` / `generate(max_new_tokens=1)`: the prompt read in one pass and one token picked;
- generate: the same with 33 new tokens; the decode rate is the 32 extra tokens over (generate - prefill), round
  by round.

Ours decodes with its weights prepared once (packed into oneDNN's layout where this CPU's recorded paths say so),
as `transformer chat` and the server do for all their requests; bf16 rows run both under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable

import torch

from transformer.cpu.linear import packed_weights
from transformer.generate import sample

LLAMA = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
TINY_LLAMA = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip


def models(smoke: bool):
    """(ours, transformers') Llama-shaped models with the same random weights, in eval mode."""
    import transformers
    from tokenizers import Tokenizer, models

    from transformer.interop import from_pretrained

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(TINY_LLAMA if smoke else LLAMA))).eval()
    hf.generation_config.eos_token_id = None  # every contender writes all its tokens
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(Path(d) / "tokenizer.json"))
        ours = from_pretrained(d, dtype="fp32").model
    ours._prepared_for_bench = held = contextlib.ExitStack()  # lives as long as the model
    held.enter_context(packed_weights(ours.decoder, ours.output))
    return ours, hf


def contenders(ours, hf, batch: int, prompt: int, new: int, bf16: bool) -> dict[str, Callable[[], int]]:
    """ "ours/HF prefill" and "ours/HF generate" calls, each returning the tokens it wrote."""
    ids = torch.randint(5, ours.config.tgt_vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))

    def ours_run(n: int) -> int:
        return sum(int(t.numel()) for t in sample(ours, ids, n, temperature=0))

    def hf_run(n: int) -> int:
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return int(out[:, prompt:].numel())

    def under(fn: Callable[[int], int], n: int) -> Callable[[], int]:
        def run() -> int:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return fn(n)

        return run

    return {
        "ours prefill": under(ours_run, 1),
        "HF prefill": under(hf_run, 1),
        "ours generate": under(ours_run, new + 1),
        "HF generate": under(hf_run, new + 1),
    }


def split(result: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The interleaved race's results as two: prefill ("ours", "HF generate") and decode, whose times are each
    round's generate time less its prefill time."""
    prefill = {"ours": result["ours prefill"], "HF generate": result["HF prefill"]}
    decode = {}
    for name, who in (("ours", "ours"), ("HF generate", "HF")):
        times = [g - p for g, p in zip(result[f"{who} generate"]["times_s"], result[f"{who} prefill"]["times_s"])]
        entry = dict(result[f"{who} generate"], times_s=times)
        entry["median_s"] = sorted(times)[len(times) // 2]
        entry.pop("alone_s", None)
        decode[name] = entry
    return prefill, decode
