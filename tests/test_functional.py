"""fastalign.functional: the TRL-compatible entry points."""

import pytest
import torch

import fastalign.functional as F
from helpers import assert_close


def test_every_exported_name_exists():
    missing = [name for name in F.__all__ if not hasattr(F, name)]
    assert not missing


def _trl_style_batch_logps(logits, labels, average, pad=-100):
    """A literal per-row loop: shift, log_softmax, gather, masked sum (or mean)."""
    out = []
    for row_logits, row_labels in zip(logits, labels):
        lp = torch.log_softmax(row_logits[:-1].float(), -1)
        y = row_labels[1:]
        keep = y != pad
        picked = lp[keep.nonzero()[:, 0], y[keep]]
        out.append(picked.mean() if average and keep.any() else picked.sum())
    return torch.stack(out)


@pytest.mark.parametrize("average", [False, True])
def test_get_batch_logps_matches_a_padded_loop(average):
    logits = torch.randn(3, 7, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = -100  # prompt
    labels[1, 5:] = -100  # right padding
    labels[2, 1:] = -100  # nothing to score: 0, not NaN
    got = F.get_batch_logps(logits, labels, average_log_prob=average)
    want = _trl_style_batch_logps(logits, labels, average)
    assert got[2].item() == 0.0
    assert_close(got, want, 1e-5)
    g, = torch.autograd.grad(got.sum(), logits)
    gw, = torch.autograd.grad(want.sum(), logits)
    assert_close(g, gw, 1e-5)


def test_get_batch_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must agree on"):
        F.get_batch_logps(torch.randn(2, 5, 9), torch.zeros(2, 4, dtype=torch.long))


def test_dpo_loss_keeps_trl_argument_order():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    losses, chosen_rewards, rejected_rewards = F.dpo_loss(pc, pr, rc, rr, 0.5, "sigmoid", 0.0, False)
    assert losses.item() == pytest.approx(0.313262, abs=1e-6)  # -log s(0.5 * 2)
    assert (chosen_rewards.item(), rejected_rewards.item()) == pytest.approx((0.5, -0.5))
