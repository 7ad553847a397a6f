"""transformer.dropout: the cheaper mask drops at rate p, in every lane of its random draws."""

import torch

from transformer.dropout import Dropout, dropout


def test_dropout_rate_scale_and_every_lane_unbiased():
    torch.manual_seed(0)
    x = torch.ones(4, 250_001)  # odd size: the last int64 draw is only partly used
    for p in (0.1, 0.3):
        y = dropout(x, p)
        values = y.unique()
        assert values.numel() == 2 and values[0] == 0 and abs(values[1].item() - 1 / (1 - p)) < 1e-6
        zero = (y == 0).flatten().float()
        assert abs(zero.mean().item() - p) < 3e-3
        # 16 bits per element come from four lanes of each 64-bit draw: each lane must drop at rate p
        lanes = zero[: zero.numel() // 4 * 4].view(-1, 4).mean(0)
        assert (lanes - p).abs().max().item() < 5e-3, lanes
        assert abs(y.mean().item() - 1.0) < 5e-3  # inverted dropout keeps the expectation
    assert dropout(x, 0.0) is x
    # a bf16 tensor stays bf16 and is scaled in its own dtype
    assert dropout(x.bfloat16(), 0.1).dtype == torch.bfloat16


def test_the_module_drops_only_in_training_mode():
    torch.manual_seed(0)
    m, x = Dropout(0.5), torch.ones(1000)
    assert (m(x) == 0).any()
    m.eval()
    assert torch.equal(m(x), x)
