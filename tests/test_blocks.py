"""The refinements of today's decoders (rotary positions, RMSNorm, gated feed-forwards, grouped-query attention,
QK-norm, sliding windows, biases per projection) as models built from scratch, in every form: the invariants
(causality, padding, cache = recompute, the window's reach), the pieces against their formulas, and learning."""

import math

import pytest
import torch

from helpers import fp32_atol, tiny_model
from transformer import ConfigError, ModelConfig
from transformer.generate import beam_search, greedy, sample
from transformer.norms import RMSNorm
from transformer.rope import RotaryEmbedding, apply_rotary

MODERN = dict(
    positional="rope",
    norm="rmsnorm",
    feed_forward="gated",
    activation="silu",
    n_heads=4,
    n_kv_heads=2,
    norm_first=True,
    qkv_bias=False,
    out_bias=False,
    ffn_bias=False,
    dropout=0.0,
)
VARIANTS = {
    "llama": {},
    "qwen3": dict(qk_norm=True, head_dim=8),
    "gemma": dict(norm="gemma_rmsnorm", activation="gelu_tanh", scale_embeddings=True, n_kv_heads=1),
    "partial": dict(rope_fraction=0.5, head_dim=8),
    "window": dict(sliding_window=3),
}


def lm(variant="llama", seed=0, **kw):
    sizes = dict(d_model=32, d_ff=48, n_decoder_layers=2)
    model = tiny_model("decoder-only", seed=seed, vocab=40, **{**sizes, **MODERN, **VARIANTS[variant], **kw})
    with torch.no_grad():  # norms away from their initial 1 (0 for Gemma's), so that each is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_later_tokens_change_nothing_before_them(variant):
    model = lm(variant)
    ids = torch.randint(4, 40, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(4, 40, (2, 5))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=fp32_atol(a, 12))
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_left_padded_row_equals_the_row_alone(variant):
    model = lm(variant)
    ids = torch.randint(4, 40, (1, 9))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 9)], dim=1)
    with torch.no_grad():
        alone = model(ids)
        inside = model(padded, attention_mask=mask)[:, 5:]
    torch.testing.assert_close(inside, alone, rtol=0, atol=fp32_atol(alone, 12))


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_steps_equal_recomputation_with_left_padding(variant):
    model = lm(variant)
    ids = torch.randint(4, 40, (2, 14))
    mask = torch.ones(2, 14)
    mask[0, :4] = 0
    with torch.no_grad():
        whole = model(ids, attention_mask=mask)
        cache = model.decoder.new_cache(2)
        parts = [model(ids[:, :6], cache, attention_mask=mask[:, :6])]
        parts += [model(ids[:, t : t + 1], cache) for t in range(6, 14)]
    stepped = torch.cat(parts, dim=1)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], whole[real], rtol=0, atol=fp32_atol(whole, 12))


def test_one_layer_with_a_window_sees_exactly_the_window():
    model = lm("window", n_decoder_layers=1)  # one layer: a token's reach is the window itself
    ids = torch.randint(4, 40, (1, 10))
    with torch.no_grad():
        base = model(ids)
        for t in range(10):
            changed = ids.clone()
            changed[0, t] = (ids[0, t] + 1 - 4) % 36 + 4
            moved = (model(changed) - base).abs().amax(-1)[0] > 1e-6  # which positions' logits changed
            assert moved.tolist() == [t <= q < t + 3 for q in range(10)], t


def test_rotation_depends_only_on_relative_position():
    cfg = ModelConfig(d_model=32, n_heads=2, positional="rope", arch="decoder-only", tgt_vocab_size=8)
    rope = RotaryEmbedding(cfg)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return float((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum())

    assert math.isclose(score(7, 3), score(104, 100), rel_tol=1e-4)
    assert not math.isclose(score(7, 3), score(7, 4), rel_tol=1e-3)
    cos, sin = rope(torch.tensor([[0]]))  # position 0 is no rotation
    torch.testing.assert_close(apply_rotary(q, cos, sin), q)


def test_rmsnorm_is_its_formula_and_gemma_s_scales_by_one_plus_weight():
    x = torch.randn(3, 16, dtype=torch.float64)
    for offset in (False, True):
        norm = RMSNorm(16, eps=1e-6, unit_offset=offset).double()
        with torch.no_grad():
            norm.weight.uniform_(-1, 1)
        scale = (1 + norm.weight) if offset else norm.weight
        expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * scale
        torch.testing.assert_close(norm(x), expected)


def test_gated_feed_forward_is_act_of_gate_times_value():
    model = lm("llama")
    ff = model.decoder.layers[0].ff
    x = torch.randn(2, 3, 32)
    gate, value = ff.linear1.weight[:48], ff.linear1.weight[48:]
    expected = (torch.nn.functional.silu(x @ gate.T) * (x @ value.T)) @ ff.linear2.weight.T
    torch.testing.assert_close(ff(x), expected, rtol=1e-5, atol=1e-5)


def test_key_value_heads_and_biases_shape_the_projections():
    model = lm("llama")
    attn = model.decoder.layers[0].self_attn
    assert attn.qkv_proj.weight.shape == (32 + 2 * 2 * 8, 32)  # 4 query heads, 2 key/value heads of 8
    assert attn.qkv_proj.bias is None and attn.out_proj.bias is None and model.decoder.layers[0].ff.linear1.bias is None
    qwen2 = lm("llama", qkv_bias=True)
    assert qwen2.decoder.layers[0].self_attn.qkv_proj.bias is not None
    assert qwen2.decoder.layers[0].self_attn.out_proj.bias is None


@pytest.mark.parametrize("arch", ["encoder-decoder", "encoder-only"])
def test_the_other_forms_take_the_same_blocks(arch):
    model = tiny_model(arch, vocab=30, num_labels=2 if arch == "encoder-only" else 0,
                       **{**MODERN, **VARIANTS["qwen3"], "n_encoder_layers": 2})  # fmt: skip
    src = torch.randint(4, 30, (3, 7))
    src[0, 5:] = 0  # right padding
    if arch == "encoder-only":
        with torch.no_grad():
            full, alone = model.classify(src), model.classify(src[:1, :5])
        torch.testing.assert_close(full[:1], alone, rtol=0, atol=fp32_atol(full, 12))
        return
    with torch.no_grad():
        cached, recomputed = greedy(model, src, max_len_b=6), greedy(model, src, max_len_b=6, use_cache=False)
    assert cached == recomputed
    assert beam_search(model, src, beam_size=1, max_len_b=6) == cached


def test_sampling_a_left_padded_batch_equals_each_prompt_alone():
    model = lm("gemma")
    short, long = torch.randint(4, 40, (1, 3)), torch.randint(4, 40, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (batch != 0).long()
    together = torch.stack(list(sample(model, batch, 8, temperature=0, attention_mask=mask)), 1)
    for row, prompt in enumerate((short, long)):
        alone = torch.stack(list(sample(model, prompt, 8, temperature=0)), 1)
        assert together[row].tolist() == alone[0].tolist()


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(positional="rope", rope_fraction=0.01), "rope_fraction"),
        (dict(rope_scaling="llama3", rope_factor=8.0), "rope_original_max_positions"),
        (dict(sliding_window=-1), "sliding_window"),
        (dict(norm="batchnorm"), "norm"),
        (dict(d_model=30, n_heads=4), "d_model"),
    ],
)
def test_bad_settings_name_their_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kw)


def test_a_head_dim_of_its_own_frees_d_model_from_the_heads():
    cfg = ModelConfig(d_model=30, n_heads=4, head_dim=8, arch="decoder-only", tgt_vocab_size=10)
    assert cfg.head_size == 8


def test_a_modern_language_model_learns():
    torch.manual_seed(0)
    model = lm("llama").train()
    text = torch.tensor([[4 + (i * 7) % 13 for i in range(33)]] * 4)  # a cycle the model must learn to continue
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model.loss(text[:, :-1], text[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05
