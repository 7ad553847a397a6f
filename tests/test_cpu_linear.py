"""transformer.cpu.linear.Linear computes what nn.Linear computes, on every path (training, packed inference,
fallbacks), and its packed weight follows the parameter."""

import copy
import pickle

import pytest
import torch
from torch import nn

from transformer import cpu
from transformer.cpu.linear import Linear, packed_weights

FP32_WORKS, BF16_WORKS = cpu.paths.works(torch.float32), cpu.paths.works(torch.bfloat16)
ALL_ON = cpu.CpuPaths(FP32_WORKS, FP32_WORKS, BF16_WORKS, why="test: every path that works here")
needs_onednn = pytest.mark.skipif(not FP32_WORKS, reason="this PyTorch build or CPU has no usable oneDNN linear")


@pytest.fixture(autouse=True, params=["onednn", "plain"])
def paths(request):
    """Every test runs twice: with every oneDNN path this CPU supports, and with none (plain F.linear), whatever
    this machine's own timing chose."""
    chosen = ALL_ON if request.param == "onednn" else cpu.CpuPaths(why="test: plain")
    if request.param == "onednn" and not FP32_WORKS:
        pytest.skip("this PyTorch build or CPU has no usable oneDNN linear")
    cpu.set_cpu_paths(chosen)
    yield chosen
    cpu.set_cpu_paths(None)


def _eval_pair(rows):
    """(ours in eval mode, its nn.Linear twin, an input of `rows` rows): the set-up of the decoding tests."""
    ours, ref = _pair()
    return ours.eval(), ref, torch.randn(rows, 48)


def _pair(in_f=48, out_f=80, bias=True):
    torch.manual_seed(0)
    ours = Linear(in_f, out_f, bias=bias)
    ref = nn.Linear(in_f, out_f, bias=bias)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48)])
def test_training_forward_and_gradients_equal_nn_linear(bias, shape):
    ours, ref = _pair(bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_fp32_training_runs_through_the_chosen_path(paths):
    ours, _ = _pair()
    y = ours(torch.randn(4, 48, requires_grad=True))
    assert ("OneDNNLinear" in y.grad_fn.name()) == paths.train


def test_non_contiguous_input():
    ours, ref = _pair()
    x = torch.randn(48, 9).t()  # (9, 48), transposed strides
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_packed_weights_equal_f_linear_and_are_dropped_after_the_block(paths):
    ours, ref, x = _eval_pair(6)
    with torch.no_grad(), packed_weights(ours):
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        assert set(ours.prepared.packed) == ({torch.float32} if paths.packed else set())
        with packed_weights(ours):  # nested: the inner block's end keeps the outer block's pack
            ours(x)
        assert bool(ours.prepared.packed) == paths.packed
    assert ours.prepared is None


def test_weights_changed_between_blocks_are_seen():
    # outside a block nothing is cached, so every way of changing a weight is seen by the next block
    ours, ref, x = _eval_pair(6)
    changes = [
        lambda m: m.weight.data.mul_(-2.0),  # through .data: no version bump
        lambda m: m.load_state_dict({"weight": torch.ones(80, 48), "bias": torch.zeros(80)}),
        lambda m: m.load_state_dict({"weight": torch.randn(80, 48), "bias": torch.randn(80)}, assign=True),
    ]
    for change in changes:
        with torch.no_grad(), packed_weights(ours):
            ours(x)
        with torch.no_grad():
            change(ours)
        ref.load_state_dict(ours.state_dict())
        with torch.no_grad(), packed_weights(ours):
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_model_made_under_inference_mode_decodes():
    with torch.inference_mode():
        ours, ref, x = _eval_pair(3)
        with packed_weights(ours):
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_copies_and_pickles_leave_the_packed_weight_behind():
    ours, ref, x = _eval_pair(3)
    with torch.no_grad(), packed_weights(ours):
        ours(x)
        twin = copy.deepcopy(ours)
        again = pickle.loads(pickle.dumps(ours))
    for m in (twin, again):
        assert m.prepared is None
    with torch.no_grad():
        torch.testing.assert_close(twin(x), ref(x), rtol=1e-5, atol=1e-5)


def test_double_backward_is_refused_or_right(paths):
    ours, ref = _pair()
    x = torch.randn(4, 48, requires_grad=True)
    (g,) = torch.autograd.grad(ours(x).pow(2).sum(), x, create_graph=True)
    if paths.train:  # oneDNN's op has no derivative of its own: refused
        with pytest.raises(RuntimeError, match="once_differentiable"):
            g.sum().backward()
    else:  # F.linear: the true second derivative, d/dW of sum(2 (xW^T+b) W) ...
        g.sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        (g_ref,) = torch.autograd.grad(ref(x_ref).pow(2).sum(), x_ref, create_graph=True)
        g_ref.sum().backward()
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_autocast_use_f_linear():
    ours, ref = _pair()
    x = torch.randn(4, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
        assert y.dtype == torch.bfloat16 and "OneDNN" not in y.grad_fn.name()  # autocast's own bf16 path
    # the right values: x W^T + b in float64, within bf16 rounding of inputs and output (8 significant bits)
    want = x.double() @ ours.weight.double().t() + ours.bias.double()
    torch.testing.assert_close(y.double(), want, atol=0.05, rtol=0.02)
    d = Linear(5, 3).double()
    xd = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(d, (xd,))


def test_packed_under_bf16_autocast_matches_f_linear(paths):
    ours, ref, x = _eval_pair(6)
    with torch.no_grad(), packed_weights(ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours(x)
            assert y.dtype == torch.bfloat16
            assert (torch.bfloat16 in ours.prepared.packed) == paths.packed_bf16  # only where this CPU packs bf16
            torch.testing.assert_close(y, ref(x))  # both bf16 products: bf16 tolerances
        # and in fp32 within the same block: a separate fp32 pack, not the bf16 one
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_empty_batch():
    ours, _ = _pair()
    assert ours(torch.randn(0, 48)).shape == (0, 80)


def test_importing_leaves_the_global_random_state_alone():
    import subprocess
    import sys

    code = (
        "import torch; torch.manual_seed(0); a = torch.rand(3); torch.manual_seed(0); import transformer; "
        "b = torch.rand(3); print(torch.equal(a, b))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_int8_weights_are_close_and_dropped_after_the_block(paths):
    from transformer.cpu.linear import int8_weights

    ours, ref, x = _eval_pair(6)
    with torch.no_grad():
        want = ref(x)
        with int8_weights(ours):
            got = ours(x)
            assert ours.prepared.int8 is not None
        assert ours.prepared is None
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)  # fp32 again after the block
    # 8-bit weights (per row) and inputs (per row or per tensor): errors of a few hundredths of a unit-scale output
    assert (got - want).abs().max() < 0.05 * want.abs().max() and not torch.equal(got, want)
    with int8_weights(ours):  # with gradients (training), the fp32 weights are used
        y = ours(x.requires_grad_())
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_int8_is_refused_by_name_where_nothing_runs_it(monkeypatch):
    from transformer import TransformerError, cpu
    from transformer.cpu import int8
    from transformer.cpu.linear import int8_weights

    monkeypatch.setattr(int8, "available", lambda: False)
    monkeypatch.setattr(cpu.int8, "fbgemm_works", lambda: False)
    ours, _ = _pair()
    with pytest.raises(TransformerError, match="fbgemm.*AVX-512 VNNI"):
        with int8_weights(ours):
            pass
    assert ours.prepared is None
