"""ORPO and SimPO as preference loss types, and the chosen NLL term of the fused loss (CPO, ORPO).

Worked example, beta = 0.1, mean log-probs per token pi_c = [-0.5, -1.2], pi_r = [-0.9, -0.4]:
ORPO's log odds of a completion are pi - log(1 - e^pi), e.g. -0.5 - log(1 - e^-0.5) = 0.432752
and -0.9 - log(1 - e^-0.9) = -0.378165, so the first pair's log odds ratio is 0.810917.
"""

import math

import pytest
import torch
from test_fused_preference import PATHS, _device, _packed_batch

from fastalign.kernels.fused_preference import fused_preference_loss
from fastalign.kernels.preference import REFERENCE_FREE_LOSS_TYPES, log1mexp, preference_loss
from helpers import assert_close

PI_C, PI_R = [-0.5, -1.2], [-0.9, -0.4]


def ls(x):  # log s(x)
    return -math.log1p(math.exp(-x))


def log_odds(c, r):
    return (c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r)))


def test_log_odds_by_hand():
    assert log_odds(-0.5, -0.9) == pytest.approx(0.810917, abs=1e-6)
    x = torch.tensor([-30.0, -2.0, -0.7, -0.6, -1e-3, -1e-9], dtype=torch.float64)
    want = [math.log(-math.expm1(v)) for v in x.tolist()]  # the accurate form everywhere in fp64
    assert log1mexp(x).tolist() == pytest.approx(want, rel=1e-12)
    # A mean log-prob of 0 (an empty completion) stays finite, with a finite gradient.
    z = torch.zeros(1, requires_grad=True)
    v = log1mexp(z)
    v.backward()
    assert torch.isfinite(v).all() and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_by_hand(beta):
    pc, pr = (torch.tensor(x, requires_grad=True) for x in (PI_C, PI_R))
    losses, r_c, r_r = preference_loss(pc, pr, beta=beta, loss_type="orpo")
    want = [-beta * ls(log_odds(c, r)) for c, r in zip(PI_C, PI_R)]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    assert r_c.tolist() == pytest.approx([beta * x for x in PI_C])
    assert r_r.tolist() == pytest.approx([beta * x for x in PI_R])
    # d/dpi_c of -beta log s(L) = -beta (1 - s(L)) dL/dpi_c, with dL/dpi_c = 1 + e^c / (1 - e^c) = 1 / (1 - e^c).
    (g,) = torch.autograd.grad(losses.sum(), pc)
    want_g = [-beta * (1 - 1 / (1 + math.exp(-log_odds(c, r)))) / (1 - math.exp(c)) for c, r in zip(PI_C, PI_R)]
    assert g.tolist() == pytest.approx(want_g, rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_by_hand(eps):
    pc, pr = torch.tensor(PI_C), torch.tensor(PI_R)
    losses, r_c, _ = preference_loss(pc, pr, beta=2.0, loss_type="simpo", label_smoothing=eps, simpo_gamma=0.3)
    u = [2.0 * (c - r) - 0.3 for c, r in zip(PI_C, PI_R)]  # [0.5, -1.9]
    assert losses.tolist() == pytest.approx([-(1 - eps) * ls(x) - eps * ls(-x) for x in u], rel=1e-6)
    assert r_c.tolist() == pytest.approx([-1.0, -2.4])


@pytest.mark.parametrize("loss_type", REFERENCE_FREE_LOSS_TYPES)
def test_reference_is_never_used(loss_type):
    pc, pr = torch.tensor(PI_C), torch.tensor(PI_R)
    free, _, _ = preference_loss(pc, pr, loss_type=loss_type)
    given, r_c, _ = preference_loss(pc, pr, torch.tensor([5.0, 5.0]), torch.tensor([-5.0, 1.0]), loss_type=loss_type)
    assert torch.equal(free, given)
    assert r_c.tolist() == pytest.approx([0.1 * x for x in PI_C])


@pytest.mark.parametrize("loss_type", REFERENCE_FREE_LOSS_TYPES)
def test_gradients_against_finite_differences(loss_type):
    inputs = [(-torch.rand(5, dtype=torch.float64) * 3 - 0.05).requires_grad_() for _ in range(2)]
    torch.autograd.gradcheck(
        lambda a, b: preference_loss(a, b, beta=0.3, loss_type=loss_type, label_smoothing=0.1)[0], inputs
    )


def _naive(hidden, weight, bias, labels, cu, chosen, rejected, average, nll_coef, **kw):
    """Full logits, log_softmax, gather; per-sequence sums (or means); the loss plus the token mean
    NLL over every chosen token, fp32."""
    logq = torch.log_softmax(hidden @ weight.t() + bias, -1)
    valid = labels != -100
    tok = torch.where(valid, logq.gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0], 0.0)
    bounds = cu.tolist()
    sums = torch.stack([tok[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    counts = torch.tensor([int(valid[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])], dtype=torch.float32)
    pi = sums / counts.clamp(min=1) if average else sums
    losses, _, _ = preference_loss(pi[chosen], pi[rejected], None, None, **kw)
    nll = -sums[chosen].sum() / counts[chosen].sum()
    return losses.mean() + nll_coef * nll, nll


@pytest.mark.parametrize("loss_type, average, reference_free", [
    ("orpo", True, False), ("simpo", True, False), ("sigmoid", False, True), ("ipo", True, True),
    ("kto_pair", False, True),  # a coupled loss type: the two-pass path
])
@pytest.mark.parametrize("path", PATHS)
def test_fused_loss_with_the_chosen_nll(path, loss_type, average, reference_free):
    device = _device(path)
    hidden, weight, bias, labels, cu = _packed_batch([9, 14, 5, 11, 8, 6, 13], [3, 5, 2, 4, 1, 2, 6], 1037, 16, device)
    chosen, rejected = torch.tensor([0, 4, 2], device=device), torch.tensor([3, 1, 6], device=device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    kw = dict(beta=0.2, loss_type=loss_type, reference_free=reference_free)
    out = fused_preference_loss(
        leaves[0], leaves[1], labels, chosen, rejected, cu_seqlens=cu, bias=leaves[2], average_log_prob=average,
        backend=path, nll_coef=0.7, **kw,
    )
    want, nll = _naive(*refs, labels, cu, chosen, rejected, average, 0.7, **kw)
    assert_close(out.loss, want, 1e-5, "loss")
    assert_close(out.nll_loss, nll, 1e-5, "nll_loss")
    for name, g, gr in zip(("hidden", "weight", "bias"), torch.autograd.grad(out.loss, leaves), torch.autograd.grad(want, refs)):
        assert_close(g, gr, 1e-5, f"grad {name}")


def test_nll_alone_is_the_chosen_cross_entropy():
    # nll_coef = 1: the loss is the pair's sigmoid loss plus the chosen tokens' mean cross-entropy.
    hidden, weight, bias, labels, cu = _packed_batch([6, 7], [2, 3], 40, 8, "cpu")
    out = fused_preference_loss(hidden, weight, labels, torch.tensor([0]), torch.tensor([1]), cu_seqlens=cu, bias=bias,
                                reference_free=True, nll_coef=1.0, backend="torch")
    keep = (labels[:6] != -100)
    ce = torch.nn.functional.cross_entropy((hidden[:6] @ weight.t() + bias)[keep], labels[:6][keep])
    assert_close(out.nll_loss, ce, 1e-6)
    assert_close(out.loss, out.losses.mean() + ce, 1e-6)
    # nll_coef = 0 (the default) leaves the loss alone but still reports the NLL.
    plain = fused_preference_loss(hidden, weight, labels, torch.tensor([0]), torch.tensor([1]), cu_seqlens=cu, bias=bias,
                                  reference_free=True, backend="torch")
    assert_close(plain.loss, out.losses.mean(), 1e-6)
    assert_close(plain.nll_loss, ce, 1e-6)


def test_an_empty_chosen_completion_gives_no_nan():
    hidden, weight, bias, labels, cu = _packed_batch([6, 6], [2, 2], 50, 8, "cpu")
    labels[:6] = -100  # truncation emptied the chosen completion: its mean is 0, its NLL has no token
    hidden.requires_grad_()
    for path in ("torch", "reference"):
        out = fused_preference_loss(hidden, weight, labels, torch.tensor([0]), torch.tensor([1]), cu_seqlens=cu,
                                    loss_type="orpo", average_log_prob=True, nll_coef=1.0, backend=path)
        (g,) = torch.autograd.grad(out.loss, hidden)
        assert torch.isfinite(out.loss) and torch.isfinite(g).all() and out.nll_loss.item() == 0.0
