"""The lean decoding step (`StepDecoder`) against the module path it stands in for, its preparation's lifetime,
and which way each of its products multiplies."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import fp32_atol, model_depth
from transformer import ModelConfig, Transformer
from transformer.cpu import decisions, int8, timing
from transformer.cpu import step as I
from transformer.cpu.linear import Linear, int8_weights, packed_weights
from transformer.generate import argmax, beam_search, greedy, topk_beams
from transformer.layers import ACTIVATIONS

CONFIGS = {
    "paper": dict(),  # post-norm, ReLU, sinusoidal positions, all embeddings tied
    "pre-norm gelu": dict(norm_first=True, activation="gelu", final_norm=True),
    "marian-like": dict(activation="silu", positional="sinusoidal_halves", output_bias=True),
    "learned untied": dict(positional="learned", max_positions=64, tie_embeddings="none", activation="gelu_tanh"),
}


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        src_vocab_size=300,
        tgt_vocab_size=300,
        d_model=64,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=128,
        dropout=0.0,
        **kw,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # random LayerNorms and biases, so that a swapped or missing one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
    return model


def padded_source(B=4, S=9):
    src = torch.randint(4, 300, (B, S), generator=torch.Generator().manual_seed(1))
    src[1, 5:] = 0
    src[3, :] = 0  # a source of padding only: the module path attends to nothing and gives zeros
    return src


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("beams", [1, 3])
def test_steps_give_the_module_paths_logits_through_reorders(name, beams):
    """Step by step, with beams swapping places and a sentence leaving, the lean step's logits are the module
    path's (fp32: the same sums in another order)."""
    model = make_model(**CONFIGS[name])
    src = padded_source()
    B, steps = src.size(0), 8
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        memory, mask = model.encode(src)
        fast = I.step_decoder(model)
        state = fast.start(memory, mask, steps, beams=beams)
        mem, msk = memory.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
        cache = model.decoder.new_cache(steps)
        sentences = torch.arange(B)
        for t in range(steps):
            tokens = torch.randint(4, 300, (sentences.numel() * beams,), generator=g)
            ours = fast.step(tokens, state)
            ref = model.decode(tokens[:, None], mem, msk, cache)[:, -1]
            torch.testing.assert_close(ours, ref, rtol=0, atol=fp32_atol(ref, model_depth(model.config)))
            n = sentences.numel()
            if t == 4:  # sentence 0 ends: its rows leave
                keep = torch.arange(1, n)
                rows = (keep[:, None] * beams + torch.randperm(beams, generator=g)).view(-1)
                state.reorder(rows, keep)
                cache.reorder(rows)
                mem, msk, sentences = mem[rows], msk[rows], sentences[keep]
            else:  # beams swap places within their sentence
                rows = (torch.arange(n)[:, None] * beams + torch.randint(0, beams, (n, beams), generator=g)).view(-1)
                state.reorder(rows)
                cache.reorder(rows, cross=False)


def test_decoding_picks_the_same_tokens_as_the_module_path(monkeypatch):
    model = make_model(3)
    src = padded_source()[:3]
    fast = (greedy(model, src, max_len_b=12), beam_search(model, src, 4, max_len_b=12))
    monkeypatch.setattr("transformer.generate.step_decoder", lambda model: None)
    assert fast == (greedy(model, src, max_len_b=12), beam_search(model, src, 4, max_len_b=12))


def test_every_way_of_multiplying_gives_the_product():
    """Each kind the step may choose (BLAS, packed oneDNN where this CPU has it, int8 by fbgemm or by the VNNI
    kernel where this CPU has it) computes x W^T + b."""
    w, b = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(5, 64)
    ref = F.linear(x, w, b)
    kinds = I._kinds("int8")
    assert "mkl" in kinds and "int8" in kinds
    for kind in kinds:
        out = I._build(kind, w, b, "int8")(x)
        # int8: each weight rounded to 1/254 of its row's largest, the input to 1/255 of its range
        tol = 0.05 * float(ref.abs().max()) if kind in ("int8", "vnni") else fp32_atol(ref, 1)
        torch.testing.assert_close(out, ref, rtol=0, atol=tol, msg=kind)


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
def test_every_product_of_the_step_applies_its_activation_and_residual(monkeypatch, activation):
    """What a step's product computes, act(x W^T + b) + residual, whichever way of multiplying it takes (each
    forced in turn: which one the timing picks differs between machines)."""
    w, b = torch.randn(96, 64) * 0.2, torch.randn(96)
    x, residual = torch.randn(20, 64), torch.randn(20, 96)
    act = ACTIVATIONS[activation] if activation else (lambda t: t)
    want = act(F.linear(x, w, b)) + residual
    for kind in I._kinds("int8"):
        monkeypatch.setenv("TRANSFORMER_STEP_PRODUCT", kind)
        product = I._Product(w, b, "int8", activation)
        assert product.kind == kind
        got = product(x, residual=residual.clone())
        # int8: each weight rounded to 1/254 of its row's largest, the input to 1/255 of its range
        tol = 0.05 * float(want.abs().max()) if kind in ("int8", "vnni") else fp32_atol(want, 2)
        torch.testing.assert_close(got, want, rtol=0, atol=tol, msg=kind)
        torch.testing.assert_close(product(x), act(F.linear(x, w, b)), rtol=0, atol=tol, msg=kind)


@pytest.mark.parametrize("beams", [1, 3])
def test_bf16_autocast_steps_match_the_module_path(beams):
    model = make_model(4, norm_first=True)
    src = padded_source()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        memory, mask = model.encode(src)
        fast = I.step_decoder(model)
        state, cache = fast.start(memory, mask, 6, beams=beams), model.decoder.new_cache(6)
        memory, mask = memory.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
        for t in range(6):
            tokens = torch.arange(memory.size(0)) % 7 + 5 + t  # beams of a sentence differ
            ours = fast.step(tokens, state).float()
            ref = model.decode(tokens[:, None], memory, mask, cache)[:, -1].float()
            # bf16 keeps 8 bits of mantissa: products rounded in another order differ by a few units of 2^-8
            torch.testing.assert_close(ours, ref, rtol=0, atol=0.05 * float(ref.abs().max()))


def test_prepared_weights_live_as_long_as_the_block(monkeypatch):
    """Outside a packed_weights()/int8_weights() block every decoding call prepares the weights afresh (an
    optimizer may have changed them without a trace); inside one they are prepared once."""
    model = make_model(5)
    src = padded_source()[:2]
    assert I.step_decoder(model) is not I.step_decoder(model)
    with packed_weights(model.decoder, model.output):
        first = I.step_decoder(model)
        assert I.step_decoder(model) is first
        greedy(model, src, max_len_b=3)
        assert I.step_decoder(model) is first
    assert model.output.prepared is None  # what was prepared is released with the block
    assert I.step_decoder(model) is not first
    before = greedy(model, src, max_len_b=6)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)  # fused: in place, versions untouched
    model.train()
    model.loss(src, src, src).backward()
    opt.step()
    model.eval()
    assert greedy(model, src, max_len_b=6) != before
    with int8_weights(model):
        q = I.step_decoder(model)
        assert I.step_decoder(model) is q and {layer.qkv.kind for layer in q.layers} <= {
            "mkl",
            "onednn",
            "int8",
            "vnni",
        }
        greedy(model, src, max_len_b=3)  # its own packed_weights() block ends inside the int8 one
        assert I.step_decoder(model) is q
    assert model.output.prepared is None


def test_output_hooks_run_and_other_hooks_take_the_module_path():
    model = make_model(6)
    src = padded_source()[:3]
    banned = greedy(model, src, max_len_b=8)[0][0]
    ban = torch.tensor([banned])
    handle = model.output.register_forward_hook(lambda m, i, logits: logits.index_fill(-1, ban, -1e9))
    assert I.step_decoder(model) is not None
    assert all(banned not in out for out in greedy(model, src, max_len_b=8))
    handle.remove()
    seen = []
    model.decoder.layers[0].register_forward_hook(lambda m, i, o: seen.append(1))
    assert I.step_decoder(model) is None  # a hook inside the decoder expects its modules to run
    greedy(model, src, max_len_b=4)
    assert seen


def test_not_used_where_the_module_path_decodes():
    model = make_model(7)
    model.train()
    assert I.step_decoder(model) is None
    model.eval().double()
    assert I.step_decoder(model) is None


@pytest.mark.parametrize("V", [8000, 8003, 300, 256])
def test_blockwise_argmax_and_topk_equal_torchs(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(7, V, generator=g)
    x[0, 100:110] = 50.0  # ties: the first of equal maxima wins, as in torch.argmax
    x[1, -1] = 60.0  # the maximum in the last, partial block
    assert torch.equal(argmax(x), x.argmax(-1))
    for K in (1, 3):  # sentences of K beams, each beam's score added to its row
        rows = x[1:]
        offset = torch.randn(6 // K, K, generator=g) * 3
        if K > 1:
            offset[0, 1:] = float("-inf")  # the first step: only the first beam may expand
        values, beam, tok = topk_beams(rows, offset, 10)
        sums = (offset[:, :, None] + rows.view(-1, K, V)).view(-1, K * V)
        ref_values, _ = sums.topk(10, -1)
        torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
        assert torch.equal(sums.gather(1, beam * V + tok), values)  # the beams and tokens of those values
        assert all(len(set(r)) == 10 for r in (beam * V + tok).tolist())  # tied ones in any order, each once


_BUILD = I._build  # the real one, beneath the timed wrappers of `_decide_afresh`


def _decide_afresh(monkeypatch, favourite):
    """As a new process would: nothing decided yet in this one, and a clock under which `favourite` times fastest
    at every shape, whatever this machine's own speeds (two processes on a busy machine can time differently)."""
    monkeypatch.delenv("TRANSFORMER_STEP_PRODUCT", raising=False)
    monkeypatch.setattr(I, "_chosen", {})
    clock = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def build(kind, *args, **kwargs):
        fn = _BUILD(kind, *args, **kwargs)

        def timed(*a, **kw):
            clock[0] += 1e-6 if kind == favourite else 1e-3
            return fn(*a, **kw)

        return timed

    monkeypatch.setattr(I, "_build", build)


def _decoded(model, src, prepared):
    """Six steps' logits of the lean step inside the block `prepared`, and greedy's and beam search's tokens."""
    with torch.no_grad(), prepared:
        memory, mask = model.encode(src)
        fast = I.step_decoder(model)
        state = fast.start(memory, mask, 6)
        tokens, logits = torch.arange(src.size(0)) + 5, []
        for _ in range(6):
            logits.append(fast.step(tokens, state))
            tokens = logits[-1].argmax(-1)
        kinds = {p.kind for layer in fast.layers for p in (layer.qkv, layer.ff1, layer.ff2)} | {fast.output.kind}
        return torch.stack(logits), greedy(model, src, max_len_b=8), beam_search(model, src, 3, max_len_b=8), kinds


def test_int8_decoding_gives_the_same_bits_whichever_product_a_timing_favours(monkeypatch, tmp_path):
    """Two processes decoding the same input in int8 give the same logits and tokens though their timings found
    different winners: which int8 product multiplies is fixed by rule, never by a timing."""
    monkeypatch.setenv("TRANSFORMER_CACHE", str(tmp_path))
    model, src = make_model(8), padded_source()
    runs = []
    for favourite in I._kinds("int8"):  # BLAS, oneDNN where it works, fbgemm, the kernel where it runs
        _decide_afresh(monkeypatch, favourite)
        runs.append(_decoded(model, src, int8_weights(model)))
    for logits, greedy_out, beam_out, _ in runs[1:]:
        assert torch.equal(logits, runs[0][0])
        assert (greedy_out, beam_out) == runs[0][1:3]
    assert all(kinds == {"vnni" if int8.available() else "int8"} for *_, kinds in runs)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("favourite", ["mkl", "onednn", "int8", "vnni"])
def test_the_int8_product_is_the_rules_whatever_the_timing(monkeypatch, kernel, favourite):
    """Under int8_weights() every product of the step takes the kernel where it runs, else fbgemm (the same as
    the modules' own int8 weights), at every shape, whichever kind a timing would favour."""
    if kernel and not int8.available():
        pytest.skip("the int8 kernel does not run here")
    if not kernel:
        monkeypatch.setattr(int8, "available", lambda: False)
    if favourite not in I._kinds("int8"):
        pytest.skip(f"{favourite} does not run here")
    _decide_afresh(monkeypatch, favourite)
    want = "vnni" if kernel else "int8"
    for out_features, in_features in [(3, 5), (96, 64), (1024, 256), (256, 1024)]:
        w, b = torch.randn(out_features, in_features), torch.randn(out_features)
        assert I._Product(w, b, "int8").kind == want
        assert I._Product(w, None, "int8", "relu").kind == want
    layer = Linear(64, 96).eval()
    with int8_weights(layer):
        assert isinstance(layer.prepared.int8, int8.Int8Weight) == kernel


def test_fp32_products_take_what_this_machine_recorded(monkeypatch, tmp_path):
    """BLAS and oneDNN sum in different orders: the first process's timings are recorded on disk, and a later
    process whose timings favour the other kind takes the recorded ones, so both decode the same bits."""
    kinds = I._kinds("fp32")
    if len(kinds) < 2:
        pytest.skip("only BLAS multiplies in fp32 here: nothing is timed")
    monkeypatch.setenv("TRANSFORMER_CACHE", str(tmp_path))
    model, src = make_model(9), padded_source()
    runs = []
    for favourite in (kinds[1], kinds[0]):
        _decide_afresh(monkeypatch, favourite)
        runs.append(_decoded(model, src, packed_weights(model.decoder, model.output)))
    first, second = runs
    assert first[3] == second[3] == {kinds[1]}  # the first process's winner, everywhere
    assert torch.equal(first[0], second[0]) and first[1:3] == second[1:3]
    recorded = decisions.path()
    assert sorted(p.name for p in recorded.parent.iterdir()) == sorted([recorded.name, recorded.stem + ".lock"])
    assert set(json.loads(recorded.read_text())["step"].values()) == {kinds[1]}


def test_fp32_products_without_a_writable_record_take_blas(monkeypatch, tmp_path):
    """Where the record cannot be kept, every process takes BLAS: fixed, rather than its own timing's pick."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("TRANSFORMER_CACHE", str(blocked / "cache"))
    for favourite in I._kinds("fp32"):
        _decide_afresh(monkeypatch, favourite)
        assert I._Product(torch.randn(96, 64), torch.randn(96), "fp32").kind == "mkl"
