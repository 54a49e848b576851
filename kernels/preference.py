"""The preference family: DPO-style losses from per-sequence log-probs, and the pairwise reward loss.

Inputs are per-pair tensors ``[P]``: the policy's and the reference's summed (or averaged)
log-probs of each pair's chosen and rejected completion. With

    rho_c = pi_c - ref_c,  rho_r = pi_r - ref_r          (per-sequence log-ratios)
    h     = (pi_c - pi_r) - (ref_c - ref_r) = rho_c - rho_r,   beta > 0,   eps = label_smoothing

the losses per pair are:

    sigmoid    -(1-eps) log s(beta h) - eps log s(-beta h)      DPO, Rafailov et al. 2023, arXiv:2305.18290;
                                                                eps > 0: conservative DPO (cDPO)
    hinge      relu(1 - beta h)                                 SLiC, Zhao et al. 2023, arXiv:2305.10425
    ipo        (h - 1/(2 beta))^2                               IPO, Azar et al. 2023, arXiv:2310.12036
    kto_pair   1 - s(beta (rho_c - KL_r)) and 1 - s(beta (KL_c - rho_r)), concatenated ([2P]),
               KL_c = max(0, mean rho_c), KL_r = max(0, mean rho_r)
                                                                KTO, Ethayarajh et al. 2024, arXiv:2402.01306
    robust     ((1-eps)(-log s(beta h)) + eps log s(-beta h)) / (1 - 2 eps)
                                                                rDPO, Chowdhury et al. 2024, arXiv:2403.00409
    exo_pair   s(beta h)(log s(beta h) - log(1-eps)) + s(-beta h)(log s(-beta h) - log eps), eps = 1e-3 if 0
                                                                EXO, Ji et al. 2024, arXiv:2402.00856
    nca_pair   -log s(beta rho_c) - 0.5 log s(-beta rho_c) - 0.5 log s(-beta rho_r)
                                                                NCA, Chen et al. 2024, arXiv:2402.05369
    bco_pair   -log s(beta rho_c - delta) - log s(-(beta rho_r - delta)), delta a running mean of the
               rewards (argument ``bco_delta``; default: this batch's mean reward, detached)
                                                                BCO, Jung et al. 2024, arXiv:2404.04656
    sppo_hard  (rho_c - 1/(2 beta))^2 + (rho_r + 1/(2 beta))^2  SPPO, Wu et al. 2024, arXiv:2405.00675
    apo_zero   1 - s(beta rho_c) + s(beta rho_r)                APO, D'Oosterlinck et al. 2024, arXiv:2408.06266
    apo_down   s(beta rho_c) + 1 - s(beta (rho_c - rho_r))      (same paper)
    aot_pair   sigmoid loss of sort(rho_c) - sort(rho_r)        AOT, Melnyk et al. 2024, arXiv:2406.05882
    aot        sigmoid loss of sort(pi_c - pi_r) - sort(ref_c - ref_r)   (same paper)
    discopop   with u = beta h, w = s(u / tau):  (1-w)(-log s(u)) + w exp(-u)
                                                                DiscoPOP, Lu et al. 2024, arXiv:2406.08414

(s is the logistic sigmoid.) Rewards are ``beta * rho_c`` and ``beta * rho_r``, detached.
``reference_free=True`` takes every reference log-prob as 0 (a reference that finds all completions
equally likely), for every loss type and for the rewards.

Two loss types never use a reference (``REFERENCE_FREE_LOSS_TYPES``: reference log-probs may be
None, rewards are ``beta * pi``). Both are meant for mean log-probs per token (``average_log_prob``):

    orpo       -beta log s(log_odds),  log_odds = (pi_c - pi_r) - (log(1 - e^pi_c) - log(1 - e^pi_r))
                                                                ORPO, Hong et al. 2024, arXiv:2403.07691
    simpo      -(1-eps) log s(beta (pi_c - pi_r) - gamma) - eps log s(-(beta (pi_c - pi_r) - gamma)),
               gamma = ``simpo_gamma``                          SimPO, Meng et al. 2024, arXiv:2405.14734

ORPO's full objective adds the chosen completions' NLL (weight 1), and CPO (Xu et al. 2024,
arXiv:2401.08417) is ``sigmoid``, ``hinge``, ``ipo`` or ``simpo`` with ``reference_free=True`` plus
that NLL times ``cpo_alpha``: per-pair losses cannot hold a token mean over the batch, so the NLL is
``fused_preference_loss``'s ``nll_coef``. ``orpo``'s ``beta`` is the paper's lambda.

``kto_pair``, ``bco_pair``, ``aot`` and ``aot_pair`` couple the pairs of a batch (batch means,
sorting); the others are separable, one pair's loss depends on that pair only.

These are a handful of elementwise ops on ``[P]`` tensors (P is the number of pairs in a batch), so
they run as plain torch on every device: a kernel launch would cost more than the math. The token
work they depend on, log-probs and their segment sums, is where the kernels are.

The pairwise reward loss (reward modeling, Ouyang et al. 2022, arXiv:2203.02155) is

    mean(-log s(r_c - r_r - margin)) + center_rewards_coefficient * mean((r_c + r_r)^2)

the second term (reward centering, Eisenstein et al. 2023, arXiv:2312.09244) keeping rewards near 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "kto_pair", "robust", "exo_pair", "nca_pair", "bco_pair",
    "sppo_hard", "apo_zero", "apo_down", "aot", "aot_pair", "discopop",
)
# Loss types whose per-pair loss depends on the other pairs of the batch.
COUPLED_LOSS_TYPES = frozenset({"kto_pair", "bco_pair", "aot", "aot_pair"})
# Loss types with no reference model (ORPO, SimPO): not DPO variants, so not in LOSS_TYPES.
REFERENCE_FREE_LOSS_TYPES = ("orpo", "simpo")


def _check_pairs(named: dict) -> int:
    sizes = {name: tuple(t.shape) for name, t in named.items() if t is not None}
    shapes = set(sizes.values())
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"per-pair inputs must all be [P] tensors of one size, got {sizes}")
    return next(iter(shapes))[0]


def _f32(t):
    """At least fp32 (fp64 stays fp64, so gradcheck can run on these ops)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _smoothed_sigmoid_loss(u, eps):
    return -F.logsigmoid(u) * (1 - eps) - F.logsigmoid(-u) * eps


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x <= 0`` without cancellation: ``log1p(-e^x)`` below ``-log 2``,
    ``log(-expm1(x))`` above (Maechler 2012). ``x = 0`` (a probability of 1, or an empty
    completion's mean of 0) is read as the largest value below 0, so the result stays finite."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's ``log(odds_c / odds_r)`` with ``odds = p / (1 - p)``, ``p = e^logp``, per pair."""
    return (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    *,
    discopop_tau: float = 0.05,
    bco_delta: float | torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and rewards: ``(losses, chosen_rewards, rejected_rewards)``.

    ``losses`` is ``[P]`` (``[2P]`` for ``kto_pair``); the rewards are ``[P]``, detached. See the
    module docstring for each ``loss_type``'s formula and paper; ``orpo`` and ``simpo`` take no
    reference (as if ``reference_free=True``).
    """
    if loss_type not in LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES:
        known = ", ".join(LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES)
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {known}")
    reference_free = reference_free or loss_type in REFERENCE_FREE_LOSS_TYPES
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not reference_free and (reference_chosen_logps is None or reference_rejected_logps is None):
        raise ValueError("reference log-probs are required unless reference_free=True")
    pi_c, pi_r = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
    _check_pairs({
        "policy_chosen_logps": pi_c, "policy_rejected_logps": pi_r,
        "reference_chosen_logps": None if reference_free else reference_chosen_logps,
        "reference_rejected_logps": None if reference_free else reference_rejected_logps,
    })
    if reference_free:
        ref_c = ref_r = torch.zeros_like(pi_c)
    else:
        ref_c, ref_r = _f32(reference_chosen_logps), _f32(reference_rejected_logps)

    rho_c, rho_r = pi_c - ref_c, pi_r - ref_r
    h = rho_c - rho_r
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * h, eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "kto_pair":
        kl_c, kl_r = rho_c.mean().clamp(min=0), rho_r.mean().clamp(min=0)
        losses = torch.cat((1 - torch.sigmoid(beta * (rho_c - kl_r)), 1 - torch.sigmoid(beta * (kl_c - rho_r))))
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        eps = eps or 1e-3
        u = beta * h
        losses = torch.sigmoid(u) * (F.logsigmoid(u) - math.log(1 - eps)) + torch.sigmoid(-u) * (
            F.logsigmoid(-u) - math.log(eps)
        )
    elif loss_type == "nca_pair":
        u_c, u_r = beta * rho_c, beta * rho_r
        losses = -F.logsigmoid(u_c) - 0.5 * F.logsigmoid(-u_c) - 0.5 * F.logsigmoid(-u_r)
    elif loss_type == "bco_pair":
        u_c, u_r = beta * rho_c, beta * rho_r
        delta = torch.cat((u_c, u_r)).mean().detach() if bco_delta is None else bco_delta
        losses = -F.logsigmoid(u_c - delta) - F.logsigmoid(-(u_r - delta))
    elif loss_type == "sppo_hard":
        losses = (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * rho_c) + torch.sigmoid(beta * rho_r)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * rho_c) + 1 - torch.sigmoid(beta * (rho_c - rho_r))
    elif loss_type == "aot_pair":
        delta = torch.sort(rho_c).values - torch.sort(rho_r).values
        losses = _smoothed_sigmoid_loss(beta * delta, eps)
    elif loss_type == "aot":
        delta = torch.sort(pi_c - pi_r).values - torch.sort(ref_c - ref_r).values
        losses = _smoothed_sigmoid_loss(beta * delta, eps)
    elif loss_type == "orpo":
        losses = -beta * F.logsigmoid(log_odds_ratio(pi_c, pi_r))
    elif loss_type == "simpo":
        losses = _smoothed_sigmoid_loss(beta * h - simpo_gamma, eps)
    else:  # discopop
        u = beta * h
        w = torch.sigmoid(u / discopop_tau)
        losses = -F.logsigmoid(u) * (1 - w) + torch.exp(-u) * w
    return losses, beta * rho_c.detach(), beta * rho_r.detach()


def reward_loss(
    rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Scalar pairwise reward loss ``mean(-log s(r_c - r_r - margin))`` (+ reward centering).

    ``rewards_*`` are ``[P]`` or ``[P, 1]`` (a scalar head's output); ``margin [P]`` optional.
    A non-finite margin or reward raises, naming the pair.
    """
    r_c, r_r = (_f32(r).squeeze(-1) if r.dim() == 2 and r.shape[-1] == 1 else _f32(r)
                for r in (rewards_chosen, rewards_rejected))
    _check_pairs({"rewards_chosen": r_c, "rewards_rejected": r_r, "margin": margin})
    for name, t in (("rewards_chosen", r_c), ("rewards_rejected", r_r), ("margin", margin)):
        if t is not None and not torch.isfinite(t).all():
            p = int((~torch.isfinite(t)).nonzero()[0])
            raise ValueError(f"{name}[{p}] = {float(t[p])} is not finite")
    diff = r_c - r_r if margin is None else r_c - r_r - margin.to(r_c)
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((r_c + r_r) ** 2)
    return loss
