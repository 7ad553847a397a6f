"""The lean decoding step of decoder-only models (cpu/lm_step.py) computes what the modules compute, for every
block kind, with left padding, in fp32, bf16 and int8, and `sample` and chat sessions take it."""

import pytest
import torch
from test_blocks import VARIANTS, lm

from helpers import fp32_atol, tiny_model
from transformer.cpu.linear import int8_weights, packed_weights
from transformer.cpu.lm_step import lm_step_decoder
from transformer.generate import sample

CLASSIC = {  # GPT-2's blocks and the paper's, with biases and added positions
    "gpt2": dict(positional="learned", norm_first=True, activation="gelu_tanh", final_norm=True),
    "paper": dict(positional="sinusoidal", norm_first=False, activation="relu"),
}


def classic(name):
    return tiny_model("decoder-only", vocab=40, d_model=32, d_ff=48, n_decoder_layers=2, **CLASSIC[name])


def models():
    return [(v, lm(v)) for v in VARIANTS] + [(c, classic(c)) for c in CLASSIC]


def steps_against_modules(model, mode="fp32", steps=8):
    """Prompts (one left-padded) read by the modules into two caches, then tokens fed by the step into one and
    by the modules into the other: their logits at each step."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (2, 7), generator=g)
    mask = torch.ones(2, 7)
    mask[0, :3] = 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16")
    block = int8_weights if mode == "int8" else packed_weights
    out = []
    with torch.no_grad(), autocast, block(model.decoder, model.output):
        fast = lm_step_decoder(model)
        assert fast is not None
        ours, theirs = model.decoder.new_cache(4), model.decoder.new_cache(4)  # both grow past 4
        model(ids, ours, attention_mask=mask)
        model(ids, theirs, attention_mask=mask)
        for _ in range(steps):
            token = torch.randint(4, 40, (2,), generator=g)
            out.append((fast.step(token, ours).float(), model(token[:, None], theirs)[:, -1].float()))
    return out


@pytest.mark.parametrize("name, model", models(), ids=lambda x: x if isinstance(x, str) else "")
def test_the_step_equals_the_modules_in_fp32(name, model):
    for a, b in steps_against_modules(model):
        torch.testing.assert_close(a, b, rtol=0, atol=fp32_atol(b, 12))


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_the_step_equals_the_modules_in_bf16_and_int8(mode):
    if mode == "int8":
        from transformer.cpu import int8

        if int8.kind() is None:
            pytest.skip("no int8 products on this machine (no fbgemm, no VNNI kernel)")
    for name, model in models():
        for a, b in steps_against_modules(model, mode):
            # bf16: the same bf16 products and roundings on both sides, but a sum may run in another order; int8:
            # the same int8 products
            torch.testing.assert_close(a, b, rtol=0, atol=0.05 * float(b.abs().max())), name


def test_sampling_takes_the_step_and_gives_the_modules_tokens(monkeypatch):
    import transformer.generate as generate

    model = lm("qwen3")
    prompt = torch.randint(4, 40, (3, 5))
    with_step = torch.stack(list(sample(model, prompt, 12, temperature=0)), 1)
    monkeypatch.setattr(generate, "lm_step_decoder", lambda m: None)  # the module path only
    modules = torch.stack(list(sample(model, prompt, 12, temperature=0)), 1)
    assert torch.equal(with_step, modules)


def test_the_step_is_not_taken_in_training_or_for_other_forms():
    model = lm("llama")
    assert lm_step_decoder(model.train()) is None
    assert lm_step_decoder(tiny_model(vocab=20)) is None  # an encoder-decoder has its own step
