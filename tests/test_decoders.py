"""Llama, Qwen2, Qwen3, Mistral, Gemma and Phi-3 checkpoints on this package's blocks, against `transformers` on
small random models it builds and saves (no download): logits on padded batches, the KV cache, greedy decoding,
export back, the rope scalings past the original context, grouped-query attention."""

import json

import pytest
import torch

from helpers import tiny_decoder_dir
from transformer import CheckpointError
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.generate import sample
from transformer.interop import export_hf, from_pretrained

transformers = pytest.importorskip("transformers")

# The bar, and what fp32 gives: two implementations of the same products differ by rounding (~1e-7
# relative at these sizes); a wrong rotation, norm or mask moves logits by 1e-2 or more.
ATOL = 1e-5
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"]
# what makes each family differ from Llama, so that its own path is exercised
EXTRA = {
    "mistral": dict(sliding_window=5),  # windows shorter than the test's sequences
    "phi3": dict(partial_rotary_factor=0.5),
    "qwen3": dict(attention_bias=True),
    "gemma": dict(hidden_act="gelu_pytorch_tanh"),
}


def padded_batch(seed=0, length=20, pad=6):
    """Two rows of random token ids; the second's first `pad` are padding (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 300, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :pad] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    """transformers' logits with left padding as its generate() feeds them: positions counted from each row's
    first token."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions).logits


def max_diff(a, b, mask):
    return float(((a - b) * mask[..., None]).abs().max())


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, tmp_path_factory):
    family = request.param
    path, hf = tiny_decoder_dir(tmp_path_factory.mktemp(family), family, **EXTRA.get(family, {}))
    return family, from_pretrained(path), hf


def test_logits_equal_transformers_on_padded_batches(imported):
    family, ckpt, hf = imported
    ids, mask = padded_batch()
    with torch.no_grad():
        full = ckpt.model(ids)
        left = ckpt.model(ids, attention_mask=mask)
    assert max_diff(full, hf_logits(hf, ids, torch.ones_like(mask)), torch.ones_like(mask)) < ATOL
    assert max_diff(left, hf_logits(hf, ids, mask), mask) < ATOL
    # right padding: the causal mask alone keeps real tokens from the pads after them
    right_ids = torch.cat([ids[1:, 6:], ids[1:, :6]], dim=1)
    right_mask = torch.cat([mask[1:, 6:], mask[1:, :6]], dim=1)
    with torch.no_grad():
        right = ckpt.model(right_ids)
    assert max_diff(right, hf_logits(hf, right_ids, right_mask), right_mask) < ATOL


def test_the_cache_steps_equal_recomputation(imported):
    _, ckpt, _ = imported
    ids, mask = padded_batch(seed=1)
    with torch.no_grad():
        whole = ckpt.model(ids, attention_mask=mask)
        cache = ckpt.model.decoder.new_cache(4)  # grows as it fills
        parts = [ckpt.model(ids[:, :9], cache, attention_mask=mask[:, :9])]
        for t in range(9, ids.size(1)):  # then one token at a time
            parts.append(ckpt.model(ids[:, t : t + 1], cache))
    assert max_diff(torch.cat(parts, dim=1), whole, mask) < ATOL


def test_greedy_equals_generate_for_32_tokens(imported):
    _, ckpt, hf = imported
    ids, mask = padded_batch(seed=2, length=7, pad=3)
    ours = torch.stack(list(sample(ckpt.model, ids, 32, temperature=0, attention_mask=mask)), dim=1)
    settings = transformers.GenerationConfig(
        max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=1
    )
    hf.generation_config.eos_token_id = None  # 32 tokens whatever they are, as `sample` gives
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, generation_config=settings)[:, ids.size(1) :]
    assert theirs.shape == (2, 32)
    assert torch.equal(ours, theirs)


def test_export_gives_transformers_the_same_model(imported, tmp_path):
    family, ckpt, hf = imported
    export_hf(ckpt, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == type(hf).__name__
    ids, mask = padded_batch(seed=3)
    assert max_diff(hf_logits(back, ids, mask), hf_logits(hf, ids, mask), mask) == 0.0


def test_a_saved_checkpoint_keeps_the_model_and_its_end_ids(imported, tmp_path):
    _, ckpt, _ = imported
    save_checkpoint(tmp_path / "ckpt", ckpt.model, ckpt.task, ckpt.tokenizers, ckpt.meta)
    back = load_checkpoint(tmp_path / "ckpt")
    assert back.config == ckpt.config
    ids, mask = padded_batch(seed=4)
    with torch.no_grad():
        assert torch.equal(back.model(ids, attention_mask=mask), ckpt.model(ids, attention_mask=mask))


ROPE_SCALINGS = [
    dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        }
    ),
]


@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=["linear", "dynamic", "llama3"])
def test_rope_scalings_equal_transformers_past_the_original_context(scaling, tmp_path):
    # max_position_embeddings 8: the 20 positions run well past it (dynamic grows its base there)
    path, hf = tiny_decoder_dir(tmp_path, "llama", max_position_embeddings=8, rope_theta=500.0, **scaling)
    ckpt = from_pretrained(path)
    assert ckpt.config.rope_scaling == scaling["rope_scaling"]["rope_type"]
    ids, mask = padded_batch(seed=5, length=20, pad=0)
    with torch.no_grad():
        ours = ckpt.model(ids)
    assert max_diff(ours, hf_logits(hf, ids, mask), mask) < ATOL
    plain, _ = tiny_decoder_dir(tmp_path / "plain", "llama", max_position_embeddings=8, rope_theta=500.0)
    with torch.no_grad():  # the scaling is not a no-op at these positions
        assert max_diff(from_pretrained(plain).model(ids), ours, mask) > 1e-3


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_attention_with_1_2_and_n_key_value_heads(kv_heads, tmp_path):
    path, hf = tiny_decoder_dir(tmp_path, "llama", num_key_value_heads=kv_heads)
    ckpt = from_pretrained(path)
    assert ckpt.config.kv_heads == kv_heads
    ids, mask = padded_batch(seed=6)
    with torch.no_grad():
        assert max_diff(ckpt.model(ids, attention_mask=mask), hf_logits(hf, ids, mask), mask) < ATOL
        cache = ckpt.model.decoder.new_cache()
        ckpt.model(ids, cache, attention_mask=mask)
    k = cache.layers[0][0].k
    assert k.size(1) == kv_heads  # the cache holds only the key/value heads


def test_end_ids_come_from_generation_config(tmp_path):
    path, _ = tiny_decoder_dir(tmp_path, "qwen2")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 2], "bos_token_id": 1}))
    cfg = from_pretrained(path).config
    assert cfg.eos_id == 2 and cfg.eos_ids == [2, 4]


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(model_type="gemma2"), "soft-caps"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling type 'yarn'"),
        (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
        (dict(use_sliding_window=True), "use_sliding_window=true"),
        (dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    ],
)
def test_what_the_blocks_cannot_reproduce_is_refused_by_name(change, needle, tmp_path):
    path, _ = tiny_decoder_dir(tmp_path, "qwen2")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None) if "rope_scaling" in change else None
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json") as e:
        from_pretrained(path)
    assert needle in str(e.value)


def test_bf16_weights_load_as_bf16_only_where_it_is_native(tmp_path, monkeypatch):
    import transformer.backend as backend

    path, hf = tiny_decoder_dir(tmp_path, "llama")
    hf.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(backend, "bf16_is_native", lambda device, native=native: native)
        assert next(from_pretrained(path).model.parameters()).dtype == dtype
    assert next(from_pretrained(path, dtype="fp32").model.parameters()).dtype == torch.float32
