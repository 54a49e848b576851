"""fastalign.functional: the TRL-compatible entry points."""

import math

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


def _ls(x):  # log s(x)
    return -math.log1p(math.exp(-x))


def _log_odds(c, r):
    return (c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r)))


def test_odds_ratio_loss_keeps_trl_sign_and_outputs():
    pc, pr = torch.tensor([-0.5, -1.2]), torch.tensor([-0.9, -0.4])
    losses, r_c, r_r, mean_ratio, mean_log_odds = F.odds_ratio_loss(pc, pr, 0.1)
    lo = [_log_odds(-0.5, -0.9), _log_odds(-1.2, -0.4)]
    assert losses.tolist() == pytest.approx([0.1 * _ls(x) for x in lo], rel=1e-6)  # <= 0: ORPO subtracts its mean
    assert mean_ratio.item() == pytest.approx(sum(_ls(x) for x in lo) / 2, rel=1e-6)
    assert mean_log_odds.item() == pytest.approx(sum(lo) / 2, rel=1e-6)
    assert (r_c.tolist(), r_r.tolist()) == (pytest.approx([-0.05, -0.12]), pytest.approx([-0.09, -0.04]))


def test_cpo_loss_types_by_hand():
    pc, pr = torch.tensor([-3.0, -2.0]), torch.tensor([-5.0, -1.0])  # h = [2, -1]
    assert F.cpo_loss(pc, pr, 0.5)[0].tolist() == pytest.approx([-_ls(1.0), -_ls(-0.5)], rel=1e-6)
    assert F.cpo_loss(pc, pr, 0.5, "hinge")[0].tolist() == pytest.approx([0.0, 1.5])
    assert F.cpo_loss(pc, pr, 0.5, "ipo")[0].tolist() == pytest.approx([1.0, 4.0])  # (h - 1)^2
    simpo = F.cpo_loss(pc, pr, 0.5, "simpo", 0.1, simpo_gamma=0.25)[0]
    assert simpo.tolist() == pytest.approx([-0.9 * _ls(x) - 0.1 * _ls(-x) for x in (0.75, -0.75)], rel=1e-6)
    assert F.simpo_loss(pc, pr, simpo_gamma=0.25)[0].tolist() == pytest.approx([-_ls(3.75), -_ls(-2.25)], rel=1e-6)
    # AlphaPO: r = (1 - p^-alpha) / alpha with p = e^logp, so r = (1 - e^(-alpha logp)) / alpha.
    losses, r_c, _ = F.cpo_loss(pc, pr, 0.5, alpha=0.25)
    r = lambda x: (1 - math.exp(-0.25 * x)) / 0.25  # noqa: E731
    assert losses.tolist() == pytest.approx([-_ls(0.5 * (r(-3) - r(-5))), -_ls(0.5 * (r(-2) - r(-1)))], rel=1e-6)
    assert r_c.tolist() == pytest.approx([0.5 * r(-3), 0.5 * r(-2)], rel=1e-6)
    with pytest.raises(ValueError, match="unknown CPO loss_type 'orpo'"):
        F.cpo_loss(pc, pr, loss_type="orpo")


def test_group_functions_are_reachable():
    adv = F.group_advantages(torch.tensor([0.0, 2.0]), 2, "none")
    assert adv.tolist() == [-1.0, 1.0]
    assert F.rloo_advantages(torch.tensor([0.0, 2.0]), 2).tolist() == [-2.0, 2.0]
    loss, _ = F.grpo_loss(torch.zeros(1, 2), None, None, adv[:1], torch.ones(1, 2), beta=0.0)
    assert loss.item() == 1.0  # -A with ratio 1
    losses, _, _, kl = F.kto_loss(torch.tensor([-1.0]), torch.zeros(0), None, torch.tensor([-1.0]), torch.zeros(0), None)
    assert losses.tolist() == [0.5] and kl.item() == 0.0  # 1 - s(0)
