"""The preference family and the reward loss: hand-derived values, gradients, bad input.

The worked example used throughout, beta = 0.5, two pairs:

    policy chosen  [-1.0, -4.0]   policy rejected  [-3.0, -2.0]
    ref chosen     [-2.0, -3.0]   ref rejected     [-2.0, -2.5]
    rho_c = pi_c - ref_c = [1, -1],   rho_r = pi_r - ref_r = [-1, 0.5],   h = rho_c - rho_r = [2, -1.5]

e.g. sigmoid: -log s(0.5 * 2) = log(1 + e^-1) = 0.313262, and -log s(-0.75) = log(1 + e^0.75) = 1.136871;
ipo: (2 - 1)^2 = 1 and (-1.5 - 1)^2 = 6.25.
"""

import math

import pytest
import torch

from fastalign.kernels.preference import LOSS_TYPES, preference_loss, reward_loss
from helpers import assert_close

PI_C, PI_R = [-1.0, -4.0], [-3.0, -2.0]
REF_C, REF_R = [-2.0, -3.0], [-2.0, -2.5]
BETA = 0.5


def s(x):
    return 1 / (1 + math.exp(-x))


def ls(x):  # log s(x)
    return -math.log1p(math.exp(-x))


def expected(loss_type, eps=0.0, pi_c=PI_C, pi_r=PI_R, ref_c=REF_C, ref_r=REF_R, beta=BETA):
    """Each formula written out per pair, in plain Python floats."""
    rc = [a - b for a, b in zip(pi_c, ref_c)]
    rr = [a - b for a, b in zip(pi_r, ref_r)]
    h = [a - b for a, b in zip(rc, rr)]
    if loss_type == "sigmoid":
        return [-(1 - eps) * ls(beta * x) - eps * ls(-beta * x) for x in h]
    if loss_type == "hinge":
        return [max(0.0, 1 - beta * x) for x in h]
    if loss_type == "ipo":
        return [(x - 1 / (2 * beta)) ** 2 for x in h]
    if loss_type == "kto_pair":
        kl_c, kl_r = max(0.0, sum(rc) / len(rc)), max(0.0, sum(rr) / len(rr))
        return [1 - s(beta * (x - kl_r)) for x in rc] + [1 - s(beta * (kl_c - x)) for x in rr]
    if loss_type == "robust":
        return [(-(1 - eps) * ls(beta * x) + eps * ls(-beta * x)) / (1 - 2 * eps) for x in h]
    if loss_type == "exo_pair":
        e = eps or 1e-3
        return [s(beta * x) * (ls(beta * x) - math.log(1 - e)) + s(-beta * x) * (ls(-beta * x) - math.log(e)) for x in h]
    if loss_type == "nca_pair":
        return [-ls(beta * c) - 0.5 * ls(-beta * c) - 0.5 * ls(-beta * r) for c, r in zip(rc, rr)]
    if loss_type == "bco_pair":
        delta = sum(beta * x for x in rc + rr) / (2 * len(rc))
        return [-ls(beta * c - delta) - ls(-(beta * r - delta)) for c, r in zip(rc, rr)]
    if loss_type == "sppo_hard":
        return [(c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2 for c, r in zip(rc, rr)]
    if loss_type == "apo_zero":
        return [1 - s(beta * c) + s(beta * r) for c, r in zip(rc, rr)]
    if loss_type == "apo_down":
        return [s(beta * c) + 1 - s(beta * (c - r)) for c, r in zip(rc, rr)]
    if loss_type == "aot_pair":
        d = [a - b for a, b in zip(sorted(rc), sorted(rr))]
        return [-(1 - eps) * ls(beta * x) - eps * ls(-beta * x) for x in d]
    if loss_type == "aot":
        pl = sorted(a - b for a, b in zip(pi_c, pi_r))
        rl = sorted(a - b for a, b in zip(ref_c, ref_r))
        return [-(1 - eps) * ls(beta * (a - b)) - eps * ls(-beta * (a - b)) for a, b in zip(pl, rl)]
    if loss_type == "discopop":
        return [(1 - s(beta * x / 0.05)) * -ls(beta * x) + s(beta * x / 0.05) * math.exp(-beta * x) for x in h]
    raise AssertionError(loss_type)


def _tensors(*lists, dtype=torch.float32):
    return [torch.tensor(x, dtype=dtype, requires_grad=True) for x in lists]


def test_worked_example_by_hand():
    pc, pr, rc, rr = _tensors(PI_C, PI_R, REF_C, REF_R)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=BETA, loss_type="sigmoid")
    assert losses.tolist() == pytest.approx([0.313262, 1.136871], abs=1e-6)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=BETA, loss_type="ipo")
    assert losses.tolist() == pytest.approx([1.0, 6.25])
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=BETA, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.0, 1.75])


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_its_formula(loss_type, eps):
    pc, pr, rc, rr = _tensors(PI_C, PI_R, REF_C, REF_R)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        pc, pr, rc, rr, beta=BETA, loss_type=loss_type, label_smoothing=eps
    )
    assert losses.tolist() == pytest.approx(expected(loss_type, eps), rel=1e-5, abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.5, -0.5])
    assert rejected_rewards.tolist() == pytest.approx([-0.5, 0.25])
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_against_finite_differences(loss_type):
    torch.manual_seed(1)
    inputs = [(torch.randn(5, dtype=torch.float64) - 3).requires_grad_() for _ in range(4)]
    # bco_pair's delta is a detached batch statistic: check it with delta held fixed.
    fixed = {"bco_delta": 0.2} if loss_type == "bco_pair" else {}
    torch.autograd.gradcheck(
        lambda a, b, c, d: preference_loss(a, b, c, d, beta=0.3, loss_type=loss_type, label_smoothing=0.1, **fixed)[0],
        inputs,
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_free_uses_zero_reference(loss_type):
    pc, pr = _tensors(PI_C, PI_R)
    losses, chosen_rewards, _ = preference_loss(pc, pr, None, None, beta=BETA, loss_type=loss_type, reference_free=True)
    zeros = [0.0, 0.0]
    assert losses.tolist() == pytest.approx(expected(loss_type, ref_c=zeros, ref_r=zeros), rel=1e-5, abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([BETA * x for x in PI_C])
    losses.sum().backward()
    assert pc.grad is not None and torch.isfinite(pc.grad).all()


def test_averaged_logps_of_an_empty_completion_give_no_nan():
    # A completion with no loss token averages to 0 (segment_mean), so IPO stays finite.
    zero = torch.zeros(1, requires_grad=True)
    losses, _, _ = preference_loss(zero, torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([-1.0]), loss_type="ipo")
    assert torch.isfinite(losses).all()
    assert losses.item() == pytest.approx((0 - 1 / 0.2) ** 2)


def test_bad_input():
    pc, pr, rc, rr = _tensors(PI_C, PI_R, REF_C, REF_R)
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        preference_loss(pc, pr, rc, rr, loss_type="dpo")
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
            preference_loss(pc, pr, rc, rr, label_smoothing=eps)
    with pytest.raises(ValueError, match="beta must be > 0"):
        preference_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="of one size"):
        preference_loss(pc, pr[:1], rc, rr)
    with pytest.raises(ValueError, match="reference log-probs are required"):
        preference_loss(pc, pr)


def test_reward_loss_by_hand():
    # r_c - r_r - margin = [2 - 0 - 1, 0.5 - 1 - 0] = [1, -0.5]
    r_c = torch.tensor([[2.0], [0.5]], requires_grad=True)
    r_r = torch.tensor([[0.0], [1.0]])
    margin = torch.tensor([1.0, 0.0])
    loss = reward_loss(r_c, r_r, margin)
    assert loss.item() == pytest.approx((-ls(1.0) - ls(-0.5)) / 2)
    centered = reward_loss(r_c, r_r, margin, center_rewards_coefficient=0.01)
    # + 0.01 * mean((2 + 0)^2, (0.5 + 1)^2) = 0.01 * (4 + 2.25) / 2
    assert centered.item() == pytest.approx(loss.item() + 0.01 * 3.125)
    (grad,) = torch.autograd.grad(loss, r_c)
    # d/dr_c of -log s(x) / 2 is -(1 - s(x)) / 2
    assert_close(grad[:, 0], torch.tensor([-(1 - s(1.0)) / 2, -(1 - s(-0.5)) / 2]), 1e-6)


def test_reward_loss_rejects_non_finite_margin():
    r = torch.zeros(3)
    with pytest.raises(ValueError, match=r"margin\[1\] = nan is not finite"):
        reward_loss(r, r, torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match=r"rewards_chosen\[2\] = inf"):
        reward_loss(torch.tensor([0.0, 0.0, float("inf")]), r)
    with pytest.raises(ValueError, match="of one size"):
        reward_loss(r, r[:2])
