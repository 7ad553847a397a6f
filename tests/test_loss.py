"""The blockwise label-smoothed cross entropy equals F.cross_entropy, value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from transformer import loss as L
from transformer.loss import label_smoothed_loss


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", [(37, 11), (600, 1000)])  # one block; several blocks with a ragged last one
def test_equals_f_cross_entropy(eps, dtype, n, v):
    torch.manual_seed(0)
    logits = (torch.randn(n, v) * 3).to(dtype).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    target = torch.randint(v, (n,))
    ours = label_smoothed_loss(logits, target, eps)
    ref = F.cross_entropy(ref_logits.float(), target, label_smoothing=eps)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    ours.backward(torch.tensor(2.5))
    ref.backward(torch.tensor(2.5))
    assert logits.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2 / n
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad.float(), rtol=1e-2, atol=tol)


def test_blocks_are_really_several(monkeypatch):
    # a block smaller than one row's worth still works (one row per block)
    monkeypatch.setattr(L, "_BLOCK", 3)
    logits = torch.randn(5, 7, requires_grad=True)
    target = torch.tensor([0, 6, 3, 3, 1])
    ours = label_smoothed_loss(logits, target, 0.2)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, label_smoothing=0.2))


def test_gradcheck_float64():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, 2, 2, 1, 3])
    assert torch.autograd.gradcheck(lambda z: label_smoothed_loss(z, target, 0.1), (logits,))


def test_no_rows_gives_zero_loss_and_a_graph():
    logits = torch.randn(0, 9, requires_grad=True)
    out = label_smoothed_loss(logits, torch.zeros(0, dtype=torch.long), 0.1)
    out.backward()
    assert out.item() == 0.0 and logits.grad.shape == (0, 9)


def test_double_backward_is_refused_not_wrong():
    logits = torch.randn(4, 6, requires_grad=True)
    (g,) = torch.autograd.grad(label_smoothed_loss(logits, torch.tensor([0, 1, 2, 3]), 0.1), logits, create_graph=True)
    # no second derivative is offered (a wrong one was, before): either no graph or a clear error
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.pow(2).sum().backward()
