"""GRPO and RLOO: group advantages, the clipped token loss and the RLOO loss, against hand-derived
values, an independent fp32 loop, finite differences, and bad input.

The loss's worked example, eps = 0.2, beta = 0.04, two rows of three tokens:

    row 0: logp [-1.0, -2.0, -0.5], old [-1.0, -2.3, -0.1], ref [-1.0, -1.8, -0.5], mask [1, 1, 1], A = +1
           ratio [1, e^0.3, e^-0.4] = [1, 1.349859, 0.670320], clipped [1, 1.2, 0.8]
           -min(ratio A, clipped A) = [-1, -1.2, -0.670320]       (token 1 clipped high)
           k3 = e^d - d - 1 with d = ref - logp = [0, 0.2, 0]: [0, 0.021403, 0]
    row 1: logp [-0.7, -1.5, pad], old [-0.2, -1.5, 0], ref [-0.7, -1.0, 0], mask [1, 1, 0], A = -2
           ratio [e^-0.5, 1] = [0.606531, 1], clipped [0.8, 1]
           -min(ratio A, clipped A) = [1.6, 2]                      (token 0 clipped low)
           k3 with d = [0, 0.5]: [0, 0.148721]
"""

import math

import pytest
import torch

from fastalign.kernels.grpo import (
    GRPO_LOSS_TYPES,
    group_advantages,
    group_reward_metrics,
    grpo_loss,
    grpo_loss_packed,
    rloo_advantages,
    rloo_loss,
)
from helpers import assert_close

NAN = float("nan")
EPS_STD = 1e-4


def k3(d):
    return math.exp(d) - d - 1


# ---- advantages --------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # Group 0: mean 2, sample std sqrt((1 + 0 + 1) / 2) = 1. Group 1: all equal, std 0 -> 0, not NaN.
    want = [-1 / (1 + EPS_STD), 0.0, 1 / (1 + EPS_STD), 0.0, 0.0, 0.0]
    assert group_advantages(r, 3).tolist() == pytest.approx(want, abs=1e-7)
    assert group_advantages(r, 3, scale_rewards=True).tolist() == pytest.approx(want, abs=1e-7)
    # Batch std: mean 3.5, squared deviations 6.25 + 2.25 + 0.25 + 3 * 2.25 = 15.5, / 5 -> sqrt(3.1).
    s = math.sqrt(3.1) + EPS_STD
    assert group_advantages(r, 3, "batch").tolist() == pytest.approx([-1 / s, 0, 1 / s, 0, 0, 0], rel=1e-6)
    assert group_advantages(r, 3, "none").tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert group_advantages(r, 3, False).tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_unscored_completions_are_left_out_and_get_zero():
    r = torch.tensor([1.0, NAN, 4.0, 2.0, 2.0, 8.0, NAN, 7.0, NAN])
    adv = group_advantages(r, 3)
    # Group 0 over {1, 4}: mean 2.5, std sqrt(2 * 1.5^2 / 1). Group 1: mean 4, std sqrt((4 + 4 + 16) / 2).
    # Group 2 has one scored reward: its std is undefined, its advantage 0.
    s0, s1 = math.sqrt(4.5) + EPS_STD, math.sqrt(12.0) + EPS_STD
    want = [-1.5 / s0, 0.0, 1.5 / s0, -2 / s1, -2 / s1, 4 / s1, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(want, abs=1e-6)
    assert group_advantages(r, 3, "none").tolist() == pytest.approx([-1.5, 0, 1.5, -2, -2, 4, 0, 0, 0])
    # RLOO: group 0's baselines are the one other scored reward: 4 and 1.
    assert rloo_advantages(r, 3)[:3].tolist() == [-3.0, 0.0, 3.0]
    assert rloo_advantages(r, 3)[6:].tolist() == [0.0, 0.0, 0.0]


def test_rloo_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # Baseline of i: (6 - r_i) / 2 = [2.5, 2, 1.5].
    assert rloo_advantages(r, 3).tolist() == [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]
    # Normalised: mean 0, sample std sqrt(2 * 2.25 / 5).
    s = math.sqrt(0.9) + EPS_STD
    assert rloo_advantages(r, 3, True).tolist() == pytest.approx([-1.5 / s, 0, 1.5 / s, 0, 0, 0], rel=1e-6)
    # k = 2: r_i - r_other.
    assert rloo_advantages(torch.tensor([1.0, 4.0]), 2).tolist() == [-3.0, 3.0]
    assert rloo_advantages(torch.tensor([1.0, 4.0]), 1).tolist() == [0.0, 0.0]


def test_group_of_one_and_low_precision_rewards():
    assert group_advantages(torch.tensor([3.0, -1.0]), 1).tolist() == [0.0, 0.0]
    adv = group_advantages(torch.tensor([1.0, 3.0], dtype=torch.bfloat16), 2)
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx([-1 / (math.sqrt(2) + EPS_STD), 1 / (math.sqrt(2) + EPS_STD)], abs=1e-7)


def test_reward_metrics_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    m = group_reward_metrics(r, 3)
    assert m["reward"].item() == pytest.approx(3.5)
    assert m["reward_std"].item() == pytest.approx(math.sqrt(3.1))
    assert m["frac_reward_zero_std"].item() == 0.5  # group 1's three completions
    assert group_reward_metrics(r, 3, "batch")["frac_reward_zero_std"].item() == 0.0


def test_advantages_bad_input():
    r = torch.zeros(6)
    with pytest.raises(ValueError, match="dividing the 6 rewards"):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        group_advantages(r, 3, "prompt")
    with pytest.raises(ValueError, match=r"rewards\[1\] = inf is not finite"):
        rloo_advantages(torch.tensor([0.0, float("inf")]), 2)
    with pytest.raises(ValueError, match="must be flat"):
        group_advantages(r.view(2, 3), 3)


# ---- the GRPO loss -----------------------------------------------------------------------------

def _example(pad=9.0):
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.5, pad]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.3, -0.1], [-0.2, -1.5, 0.0]])
    ref = torch.tensor([[-1.0, -1.8, -0.5], [-0.7, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, ref, torch.tensor([1.0, -2.0]), mask


ROW0 = [-1.0, -1.2 + 0.04 * k3(0.2), -math.exp(-0.4)]
ROW1 = [1.6, 2.0 + 0.04 * k3(0.5)]


@pytest.mark.parametrize("loss_type, want", [
    ("grpo", (sum(ROW0) / 3 + sum(ROW1) / 2) / 2),
    ("bnpo", (sum(ROW0) + sum(ROW1)) / 5),
    ("dr_grpo", (sum(ROW0) + sum(ROW1)) / (2 * 4)),
    ("dapo", (sum(ROW0) + sum(ROW1)) / 5),
])
def test_grpo_loss_by_hand(loss_type, want):
    logp, old, ref, adv, mask = _example()
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type, max_completion_length=4)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)
    assert metrics["clip_ratio/low_min"].item() == 0.0  # row 0: no token clipped low
    assert metrics["clip_ratio/high_max"].item() == pytest.approx(1 / 3)  # row 0: 1 of 3
    assert metrics["kl"].item() == pytest.approx((k3(0.2) + k3(0.5)) / 5, rel=1e-5)


def test_dapo_divides_by_the_global_token_count():
    logp, old, ref, adv, mask = _example()
    loss, _ = grpo_loss(logp, old, ref, adv, mask, loss_type="dapo", num_items_in_batch=torch.tensor(10.0))
    assert loss.item() == pytest.approx((sum(ROW0) + sum(ROW1)) / 10, rel=1e-6)


def test_gradients_by_hand():
    # bnpo, beta = 0: d l / d logp_t = -A ratio_t where the unclipped term is the minimum, else 0.
    logp, old, _, adv, mask = _example()
    loss, metrics = grpo_loss(logp, old, None, adv, mask, beta=0.0, loss_type="bnpo")
    (g,) = torch.autograd.grad(loss, logp)
    want = torch.tensor([[-1.0, 0.0, -math.exp(-0.4)], [0.0, 2.0, 0.0]]) / 5
    assert_close(g, want, 1e-6)
    assert "kl" not in metrics


def test_masked_padding_gives_no_nan():
    # A masked position whose log-prob overflows exp() must not reach the loss or its gradient.
    logp, old, ref, adv, mask = _example(pad=100.0)
    for loss_type in GRPO_LOSS_TYPES:
        loss, metrics = grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type, max_completion_length=4)
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(g).all() and g[1, 2] == 0
        assert all(torch.isfinite(v) for v in metrics.values())


def test_an_empty_row_counts_zero_in_grpo_and_is_skipped_by_the_extremes():
    logp, old, ref, adv, mask = _example()
    logp = torch.cat((logp, torch.zeros(1, 3)))
    old, ref, mask = torch.cat((old, torch.zeros(1, 3))), torch.cat((ref, torch.zeros(1, 3))), torch.cat((mask, torch.zeros(1, 3, dtype=torch.long)))
    adv = torch.tensor([1.0, -2.0, 5.0])
    loss, metrics = grpo_loss(logp, old, ref, adv, mask)
    assert loss.item() == pytest.approx((sum(ROW0) / 3 + sum(ROW1) / 2 + 0.0) / 3, rel=1e-6)
    assert metrics["clip_ratio/low_min"].item() == 0.0 and metrics["clip_ratio/high_max"].item() == pytest.approx(1 / 3)
    # All rows empty: loss 0, the token means 0, the per-sequence extremes undefined (NaN, as TRL's nanmin).
    loss, metrics = grpo_loss(logp, old, ref, adv, torch.zeros_like(mask), loss_type="bnpo")
    assert loss.item() == 0.0 and metrics["clip_ratio/low_mean"].item() == 0.0
    assert math.isnan(metrics["clip_ratio/low_min"].item())


def test_no_old_logprobs_means_ratio_one():
    logp, _, ref, adv, mask = _example()
    loss, metrics = grpo_loss(logp, None, None, adv, mask, beta=0.0, loss_type="bnpo")
    assert loss.item() == pytest.approx(-(1 * 3 - 2 * 2) / 5)
    assert metrics["clip_ratio/region_mean"].item() == 0.0
    (g,) = torch.autograd.grad(loss, logp)
    assert_close(g, torch.tensor([[-1.0, -1.0, -1.0], [2.0, 2.0, 0.0]]) / 5, 1e-6)


def test_epsilon_high():
    logp, old, ref, adv, mask = _example()
    # eps_high = 0.4: token 1 of row 0 (ratio 1.3499) is no longer clipped.
    loss, metrics = grpo_loss(logp, old, None, adv, mask, epsilon_high=0.4, beta=0.0, loss_type="bnpo")
    assert loss.item() == pytest.approx((-1 - math.exp(0.3) - math.exp(-0.4) + 1.6 + 2) / 5, rel=1e-6)
    assert metrics["clip_ratio/high_mean"].item() == 0.0


def _loop_reference(logp, old, ref, adv, mask, eps_low, eps_high, beta, loss_type, max_len):
    """TRL's formulas row by row, in fp32, over the kept tokens only."""
    rows, total, count = [], 0.0, 0.0
    for b in range(logp.shape[0]):
        keep = mask[b].bool()
        lp, o = logp[b][keep].float(), old[b][keep].float()
        a = adv[b] if adv.dim() == 1 else adv[b][keep]
        ratio = torch.exp(lp - o)
        lt = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
        if beta:
            d = ref[b][keep].float() - lp
            lt = lt + beta * (torch.exp(d) - d - 1)
        rows.append(lt.sum() / max(int(keep.sum()), 1))
        total, count = total + lt.sum(), count + int(keep.sum())
    if loss_type == "grpo":
        return torch.stack(rows).mean()
    if loss_type == "dr_grpo":
        return total / (logp.shape[0] * max_len)
    return total / max(count, 1)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_padded_and_packed_match_a_loop(loss_type, per_token_adv):
    B, T = 5, 7
    lengths = [7, 3, 0, 1, 5]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1  # left padding
    logp = (torch.randn(B, T) * 0.5 - 1).requires_grad_()
    old = logp.detach() + torch.randn(B, T) * 0.3
    ref = logp.detach() + torch.randn(B, T) * 0.3
    adv = torch.randn(B, T) if per_token_adv else torch.randn(B)
    kw = dict(epsilon=0.2, epsilon_high=0.28, beta=0.1, loss_type=loss_type, max_completion_length=9)
    loss, _ = grpo_loss(logp, old, ref, adv, mask, **kw)
    want = _loop_reference(logp, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 9)
    assert_close(loss, want, 1e-6)
    g, gw = (torch.autograd.grad(x, logp)[0] for x in (loss, want))
    assert_close(g, gw, 1e-6)
    if per_token_adv:
        return
    # Packed: the kept tokens end to end.
    keep = mask.bool()
    flat = logp.detach()[keep].clone().requires_grad_()
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    packed, _ = grpo_loss_packed(flat, old[keep], ref[keep], adv, cu, **kw)
    assert_close(packed, want, 1e-6)
    (gp,) = torch.autograd.grad(packed, flat)
    assert_close(gp, gw[keep], 1e-6)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_gradients_against_finite_differences(loss_type):
    logp = (torch.randn(3, 5, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    old = logp.detach() + torch.randn(3, 5, dtype=torch.float64) * 0.1
    ref = logp.detach() + torch.randn(3, 5, dtype=torch.float64) * 0.2
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 1]])
    adv = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    torch.autograd.gradcheck(
        lambda x: grpo_loss(x, old, ref, adv, mask, epsilon=0.2, beta=0.05, loss_type=loss_type, max_completion_length=6)[0],
        (logp,),
    )


def test_packed_mask_and_low_precision_inputs():
    # bf16 log-probs: the loss runs in fp32 on their values.
    logp = torch.tensor([-1.0, -2.0, -0.5, -0.7, -1.5], dtype=torch.bfloat16, requires_grad=True)
    old = torch.tensor([-1.0, -2.3, -0.1, -0.2, -1.5], dtype=torch.bfloat16)
    cu = torch.tensor([0, 3, 5])
    mask = torch.tensor([1, 1, 1, 1, 0])
    loss, _ = grpo_loss_packed(logp, old, None, torch.tensor([1.0, -2.0]), cu, mask, beta=0.0, loss_type="bnpo")
    r = [math.exp(float(a) - float(b)) for a, b in zip(logp.detach().float(), old.float())]
    want = (-1 * min(r[0], 1.2) - min(r[1], 1.2) - min(r[2], 1.2) + 2 * max(r[3], 0.8)) / 4
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want, rel=1e-6)
    (g,) = torch.autograd.grad(loss, logp)
    assert g.dtype == torch.bfloat16 and g[4] == 0


def test_grpo_loss_bad_input():
    logp, old, ref, adv, mask = _example()
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logprobs are required when beta != 0"):
        grpo_loss(logp, old, None, adv, mask)
    with pytest.raises(ValueError, match="needs max_completion_length"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match=r"advantages \(3,\) must be \[B\]"):
        grpo_loss(logp, old, ref, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="mask .* must match logprobs"):
        grpo_loss(logp, old, ref, adv, mask[:, :2])
    with pytest.raises(ValueError, match="beta must be >= 0"):
        grpo_loss(logp, old, ref, adv, mask, beta=-0.1)
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to N=5"):
        grpo_loss_packed(torch.zeros(5), None, None, torch.zeros(2), torch.tensor([0, 3, 4]), beta=0.0)
    with pytest.raises(ValueError, match=r"must be one per sequence: \[S\] = \[2\]"):
        grpo_loss_packed(torch.zeros(5), None, None, torch.zeros(5), torch.tensor([0, 3, 5]), beta=0.0)


# ---- the RLOO loss -----------------------------------------------------------------------------

def test_rloo_loss_by_hand():
    logps = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)
    old = torch.tensor([-3.5, -4.0, -2.0])
    adv = torch.tensor([1.0, 1.0, -0.5])
    # ratios [e^0.5, e^-1, 1]: the first clipped high (at 1.2), the second below 0.8 but with A > 0.
    loss, metrics = rloo_loss(logps, old, adv)
    assert loss.item() == pytest.approx((-1.2 - math.exp(-1) + 0.5) / 3, rel=1e-6)
    (g,) = torch.autograd.grad(loss, logps)
    assert_close(g, torch.tensor([0.0, -math.exp(-1), 0.5]) / 3, 1e-6)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert metrics["clip_ratio/high_max"].item() == 1.0
    assert metrics["clip_ratio/low_mean"].item() == 0.0 and metrics["clip_ratio/low_min"].item() == 0.0
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(1 / 3)
    assert "kl" not in metrics
