import pytest
import torch
from torch import nn

from helpers import fp32_atol, model_depth
from transformer import ConfigError, ModelConfig, Transformer, TransformerLayer, TransformerLM
from transformer.attention import padding_mask

PAD = 0


def small_config(**kw) -> ModelConfig:
    base = dict(
        src_vocab_size=23,
        tgt_vocab_size=19,
        d_model=32,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=64,
        dropout=0.0,
        pad_id=PAD,
    )
    base.update(kw)
    return ModelConfig(**base)


def copy_to_torch_transformer(model: Transformer) -> nn.Transformer:
    """An nn.Transformer of the same shape holding our model's weights."""
    cfg = model.config
    ref = nn.Transformer(
        cfg.d_model,
        cfg.n_heads,
        cfg.n_encoder_layers,
        cfg.n_decoder_layers,
        cfg.d_ff,
        dropout=0.0,
        activation=cfg.activation,
        batch_first=True,
        norm_first=cfg.norm_first,
        layer_norm_eps=cfg.layer_norm_eps,
    )

    def attn(dst: nn.MultiheadAttention, src) -> None:
        if src.cross:
            dst.in_proj_weight.copy_(torch.cat([src.q_proj.weight, src.kv_proj.weight]))
            dst.in_proj_bias.copy_(torch.cat([src.q_proj.bias, src.kv_proj.bias]))
        else:
            dst.in_proj_weight.copy_(src.qkv_proj.weight)
            dst.in_proj_bias.copy_(src.qkv_proj.bias)
        dst.out_proj.load_state_dict(src.out_proj.state_dict())

    with torch.no_grad():
        for ours, theirs in zip(model.encoder.layers, ref.encoder.layers):
            attn(theirs.self_attn, ours.self_attn)
            theirs.linear1.load_state_dict(ours.ff.linear1.state_dict())
            theirs.linear2.load_state_dict(ours.ff.linear2.state_dict())
            theirs.norm1.load_state_dict(ours.self_attn_norm.state_dict())
            theirs.norm2.load_state_dict(ours.ff_norm.state_dict())
        for ours, theirs in zip(model.decoder.layers, ref.decoder.layers):
            attn(theirs.self_attn, ours.self_attn)
            attn(theirs.multihead_attn, ours.cross_attn)
            theirs.linear1.load_state_dict(ours.ff.linear1.state_dict())
            theirs.linear2.load_state_dict(ours.ff.linear2.state_dict())
            theirs.norm1.load_state_dict(ours.self_attn_norm.state_dict())
            theirs.norm2.load_state_dict(ours.cross_attn_norm.state_dict())
            theirs.norm3.load_state_dict(ours.ff_norm.state_dict())
        for ours, theirs in ((model.encoder, ref.encoder), (model.decoder, ref.decoder)):
            if ours.norm is None:
                theirs.norm = nn.Identity()
            else:
                theirs.norm.load_state_dict(ours.norm.state_dict())
    return ref.eval()


def randomize_norms_and_biases(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name and "weight" in name else 0.0))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, 23, (3, 9), generator=g)
    tgt = torch.randint(1, 19, (3, 7), generator=g)
    src[1, 6:] = PAD
    src[2, 3:] = PAD
    tgt[0, 5:] = PAD
    tgt[2, 2:] = PAD
    return src, tgt


@pytest.mark.parametrize("final_norm", [True, None])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_equals_torch_transformer(norm_first, activation, final_norm):
    """final_norm None is the default: a final LayerNorm only with pre-norm (so post-norm has none, as the
    paper and the benchmarks' model). nn.Transformer always has one; it is replaced by identity there."""
    torch.manual_seed(0)
    model = Transformer(small_config(norm_first=norm_first, activation=activation, final_norm=final_norm)).eval()
    randomize_norms_and_biases(model)
    ref = copy_to_torch_transformer(model)
    src, tgt = batch()
    with torch.no_grad():
        ours = model(src, tgt)
        src_x = model.encoder.positions(model.encoder.embed(src))
        tgt_x = model.decoder.positions(model.decoder.embed(tgt))
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1))
        hidden = ref(
            src_x,
            tgt_x,
            tgt_mask=causal,
            src_key_padding_mask=src == PAD,
            tgt_key_padding_mask=tgt == PAD,
            memory_key_padding_mask=src == PAD,
            tgt_is_causal=True,
        )
        theirs = model.output(hidden)
    real = tgt != PAD  # torch gives pad query positions other values; they are never used
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)


def test_final_norm_defaults_follow_norm_first():
    assert Transformer(small_config()).encoder.norm is None
    assert Transformer(small_config(norm_first=True)).encoder.norm is not None
    assert Transformer(small_config(final_norm=True)).decoder.norm is not None


@pytest.mark.parametrize("cross", [False, True])
def test_gradcheck_layers_float64(cross):
    torch.manual_seed(0)
    layer = TransformerLayer(small_config(d_model=8, n_heads=2, d_ff=12), cross_attention=cross).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    mem_mask = padding_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), 0)
    if cross:
        fn = lambda a, m: layer(a, is_causal=True, memory=m, memory_mask=mem_mask)
        assert torch.autograd.gradcheck(fn, (x, mem))
    else:
        self_mask = padding_mask(torch.tensor([[1, 1, 0], [1, 1, 1]]), 0)
        assert torch.autograd.gradcheck(lambda a: layer(a, mask=self_mask), (x,))


@pytest.mark.parametrize("norm_first", [False, True])
def test_causality_future_targets_change_nothing_before(norm_first):
    torch.manual_seed(0)
    model = Transformer(small_config(norm_first=norm_first)).eval()
    src, tgt = batch()
    tgt = tgt.clamp(min=1)
    t = 3
    changed = tgt.clone()
    changed[:, t + 1 :] = torch.randint(1, 19, changed[:, t + 1 :].shape)
    with torch.no_grad():
        a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=fp32_atol(a, model_depth(model.config)), rtol=0)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the test can see a change


def test_appending_source_padding_changes_nothing():
    torch.manual_seed(0)
    model = Transformer(small_config()).eval()
    src, tgt = batch()
    padded = torch.cat([src, torch.full((3, 5), PAD)], dim=1)
    with torch.no_grad():
        logits = model(src, tgt)
        torch.testing.assert_close(
            logits, model(padded, tgt), atol=fp32_atol(logits, model_depth(model.config)), rtol=0
        )
        mem_a, _ = model.encode(src)
        mem_b, _ = model.encode(padded)
    real = src != PAD
    tol = fp32_atol(mem_a, 4 * 2 * model.config.n_encoder_layers)  # the encoder alone: 2 sublayers per layer
    torch.testing.assert_close(mem_a[real], mem_b[:, : src.size(1)][real], atol=tol, rtol=0)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_cached_decoding_equals_full_recompute(positional):
    torch.manual_seed(0)
    model = Transformer(small_config(positional=positional, n_decoder_layers=3)).eval()
    src, tgt = batch()
    tgt = tgt.clamp(min=1)
    with torch.no_grad():
        full = model(src, tgt)
        memory, mask = model.encode(src)
        cache = model.decoder.new_cache(capacity=2)  # small, so the cache has to grow on the way
        steps = [model.decode(tgt[:, i : i + 1], memory, mask, cache) for i in range(tgt.size(1))]
        # a block of several new tokens after cached ones also matches
        cache2 = model.decoder.new_cache()
        block = torch.cat(
            [model.decode(tgt[:, :3], memory, mask, cache2), model.decode(tgt[:, 3:], memory, mask, cache2)], 1
        )
    tol = fp32_atol(full, model_depth(model.config))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=tol, rtol=0)
    torch.testing.assert_close(block, full, atol=tol, rtol=0)


def test_lm_cached_decoding_and_causality():
    torch.manual_seed(0)
    model = TransformerLM(small_config(arch="decoder-only", tie_embeddings="decoder")).eval()
    ids = torch.randint(1, 19, (2, 8))
    with torch.no_grad():
        full = model(ids)
        cache = model.decoder.new_cache()
        steps = torch.cat([model(ids[:, i : i + 1], cache) for i in range(8)], 1)
        changed = ids.clone()
        changed[:, 5:] = 1
        other = model(changed)
    tol = fp32_atol(full, 4 * 2 * model.config.n_decoder_layers + 1)  # no cross-attention: 2 sublayers per layer
    torch.testing.assert_close(steps, full, atol=tol, rtol=0)
    torch.testing.assert_close(other[:, :5], full[:, :5], atol=tol, rtol=0)
    assert model.output.weight is model.decoder.embed.weight


@pytest.mark.parametrize("tying", ["none", "decoder", "all"])
def test_embedding_tying(tying):
    model = Transformer(small_config(src_vocab_size=19, tie_embeddings=tying))
    shared_out = model.output.weight is model.decoder.embed.weight
    shared_src = model.encoder.embed is model.decoder.embed
    assert shared_out == (tying != "none")
    assert shared_src == (tying == "all")


def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    model = Transformer(small_config())
    src, tgt = batch()
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model.loss(src, tgt_in, tgt_out)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0
    assert loss.item() < 0.02


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(d_ff=0), "d_ff"),
        (dict(dropout=1.0), "dropout"),
        (dict(attention_dropout=-0.1), "attention_dropout"),
        (dict(n_heads=0), "n_heads"),
        (dict(activation="swish"), "activation"),
        (dict(tie_embeddings="all"), "tie_embeddings"),
        (dict(src_vocab_size=-1), "src_vocab_size"),
    ],
)
def test_invalid_config_names_field_and_value(kw, field):
    with pytest.raises(ConfigError, match=field) as e:
        small_config(**kw)
    assert repr(list(kw.values())[-1]) in str(e.value)


def test_long_input_with_sinusoidal_positions():
    """Positions past the table's first size (64) follow the formula, and the grown table changes nothing."""
    import math

    model = Transformer(small_config()).eval()
    src = torch.randint(1, 23, (1, 3000))
    tgt = torch.ones(1, 2, dtype=torch.long)
    with torch.no_grad():
        out = model(src, tgt)
        again = model(src, tgt)  # now with the grown table from the start
    table = model.encoder.positions.table
    assert table.size(0) >= 3000
    d = model.config.d_model
    for pos in (0, 63, 64, 2999):
        for i in (0, 5):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert torch.isfinite(out).all() and torch.equal(out, again)
    # and what the encoder adds to its embeddings is that formula at every position, past 64 too
    added = model.encoder.positions(torch.zeros(1, 3000, d))[0].double()
    angle = torch.arange(3000, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(0, d, 2) / d)
    want = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)  # sin, cos interleaved
    # atol: the table's angles are rounded to float32, which moves sin/cos by up to ~2e-5 at position 3000
    torch.testing.assert_close(added, want, atol=1e-4, rtol=0)


def test_loss_on_padded_targets_equals_cross_entropy():
    """Transformer.loss (the blockwise loss over non-pad targets) equals F.cross_entropy with ignore_index and
    label smoothing over the whole padded batch, value and gradient."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = Transformer(small_config()).train()
    src, tgt = batch()
    tgt_in = tgt.clone()
    tgt_out = torch.roll(tgt, -1, dims=1)
    tgt_out[tgt == PAD] = PAD
    ours = model.loss(src, tgt_in, tgt_out, label_smoothing=0.1)
    (g_ours,) = torch.autograd.grad(ours, model.output.weight)
    ref = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=PAD, label_smoothing=0.1)
    (g_ref,) = torch.autograd.grad(ref, model.output.weight)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)
