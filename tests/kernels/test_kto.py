"""Unpaired KTO and APO-zero against hand-derived values, gradients, and bad input.

Worked example, beta = 0.5: desirable completions pi = [-2, -1], ref = [-3, -1.5] (rho = [1, 0.5]);
one undesirable pi = [-4], ref = [-3] (rho = [-1]); KL completions pi_KL = [-5, -6, -4],
ref_KL = [-5.5, -6.3, -4.5], whose mean difference z0 = (0.5 + 0.3 + 0.5) / 3 = 0.433333 > 0.
"""

import math

import pytest
import torch

from fastalign.kernels.kto import kto_kl, kto_loss
from helpers import assert_close

Z0 = 1.3 / 3


def s(x):
    return 1 / (1 + math.exp(-x))


def _inputs(dtype=torch.float32):
    t = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    pc, pr = t([-2.0, -1.0]).requires_grad_(), t([-4.0]).requires_grad_()
    return pc, pr, t([-5.0, -6.0, -4.0]), t([-3.0, -1.5]), t([-3.0]), t([-5.5, -6.3, -4.5])


def test_kto_by_hand():
    pc, pr, pk, rc, rr, rk = _inputs()
    losses, r_c, r_r, kl = kto_loss(pc, pr, pk, rc, rr, rk, beta=0.5, desirable_weight=1.0, undesirable_weight=1.33)
    want = [1 - s(0.5 * (1 - Z0)), 1 - s(0.5 * (0.5 - Z0)), 1.33 * (1 - s(0.5 * (Z0 + 1)))]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    assert kl.item() == pytest.approx(Z0, rel=1e-6)
    assert r_c.tolist() == [0.5, 0.25] and r_r.tolist() == [-0.5]
    assert not (r_c.requires_grad or r_r.requires_grad or kl.requires_grad)
    # d/dpi of 1 - s(beta (rho - z0)) is -beta s (1 - s); z0 is held fixed (detached).
    g_c, g_r = torch.autograd.grad(losses.sum(), (pc, pr))
    u = [0.5 * (1 - Z0), 0.5 * (0.5 - Z0)]
    assert_close(g_c, torch.tensor([-0.5 * s(x) * (1 - s(x)) for x in u]), 1e-6)
    v = 0.5 * (Z0 + 1)
    assert_close(g_r, torch.tensor([1.33 * 0.5 * s(v) * (1 - s(v))]), 1e-6)


def test_negative_kl_estimate_is_clamped_to_zero():
    pc, pr, pk, rc, rr, _ = _inputs()
    losses, _, _, kl = kto_loss(pc, pr, pk, rc, rr, pk + 0.2, beta=0.5)
    assert kl.item() == 0.0
    assert losses.tolist() == pytest.approx([1 - s(0.5), 1 - s(0.25), 1 - s(0.5)], rel=1e-6)
    assert kto_kl(pk, pk + 0.2).item() == pytest.approx(-0.2)


def test_kl_given_as_a_process_mean():
    pc, pr, pk, rc, rr, rk = _inputs()
    losses, _, _, kl = kto_loss(pc, pr, pk, rc, rr, rk, beta=0.5, kl=torch.tensor(0.1))
    assert kl.item() == pytest.approx(0.1)
    assert losses[0].item() == pytest.approx(1 - s(0.5 * 0.9), rel=1e-6)
    assert kto_loss(pc, pr, None, rc, rr, None, beta=0.5)[3].item() == 0.0


def test_apo_zero_unpaired_by_hand():
    pc, pr, pk, rc, rr, rk = _inputs()
    losses, _, _, kl = kto_loss(pc, pr, pk, rc, rr, rk, beta=0.5, loss_type="apo_zero_unpaired", undesirable_weight=2.0)
    assert losses.tolist() == pytest.approx([1 - s(0.5), 1 - s(0.25), 2 * s(-0.5)], rel=1e-6)
    assert kl.item() == 0.0


def test_only_desirable_or_only_undesirable_rows():
    pc, pr, pk, rc, rr, rk = _inputs()
    empty = torch.zeros(0)
    losses, r_c, r_r, _ = kto_loss(pc, empty, pk, rc, empty, rk, beta=0.5)
    assert losses.shape == (2,) and r_r.shape == (0,)
    losses, _, _, _ = kto_loss(empty, pr, pk, empty, rr, rk, beta=0.5)
    assert losses.tolist() == pytest.approx([1 - s(0.5 * (Z0 + 1))], rel=1e-6)


def test_gradients_against_finite_differences():
    pc, pr = (torch.randn(4, dtype=torch.float64) - 3).requires_grad_(), (torch.randn(3, dtype=torch.float64) - 3).requires_grad_()
    rc, rr = torch.randn(4, dtype=torch.float64) - 3, torch.randn(3, dtype=torch.float64) - 3
    pk, rk = torch.randn(5, dtype=torch.float64) - 3, torch.randn(5, dtype=torch.float64) - 3.5
    for loss_type in ("kto", "apo_zero_unpaired"):
        torch.autograd.gradcheck(lambda a, b: kto_loss(a, b, pk, rc, rr, rk, 0.3, 1.0, 1.5, loss_type)[0], (pc, pr))


def test_low_precision_inputs_compute_in_fp32():
    pc, pr, pk, rc, rr, rk = _inputs(torch.bfloat16)
    losses, r_c, _, _ = kto_loss(pc, pr, pk, rc, rr, rk, beta=0.5)
    assert losses.dtype == torch.float32 and r_c.dtype == torch.float32
    # On the values bf16 holds (-6.3 is -6.3125 there), in fp32.
    z0 = sum(float(a) - float(b) for a, b in zip(pk, rk)) / 3
    assert losses[0].item() == pytest.approx(1 - s(0.5 * (1 - z0)), rel=1e-6)


def test_bad_input():
    pc, pr, pk, rc, rr, rk = _inputs()
    with pytest.raises(ValueError, match="unknown loss_type 'bco'"):
        kto_loss(pc, pr, pk, rc, rr, rk, loss_type="bco")
    with pytest.raises(ValueError, match="beta must be > 0"):
        kto_loss(pc, pr, pk, rc, rr, rk, beta=0.0)
    with pytest.raises(ValueError, match="policy_chosen_logps .* must be one"):
        kto_loss(pc, pr, pk, rc[:1], rr, rk)
    with pytest.raises(ValueError, match="reference_KL_logps are required"):
        kto_loss(pc, pr, pk, rc, rr, None)
    with pytest.raises(ValueError, match="must be \\[K\\] of one size"):
        kto_loss(pc, pr, pk, rc, rr, rk[:2])
