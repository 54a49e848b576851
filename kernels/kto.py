"""KTO on unpaired data: each completion is desirable or undesirable on its own.

Inputs are per-sequence log-probs, summed over each completion's tokens: the policy's and the
reference's, for the desirable completions ``[C]``, the undesirable ones ``[R]``, and for the KL
estimate, completions paired with a prompt that is not theirs ``[K]`` (TRL's data pipeline shifts
the completions of a batch by one). With rho = pi - ref per completion,

    z0        = max(0, mean_K(pi_KL - ref_KL)), detached      (a batch estimate of KL(pi || ref))
    kto       desirable:   1 - s(beta (rho - z0))      undesirable:  1 - s(beta (z0 - rho))
                                                                KTO, Ethayarajh et al. 2024, arXiv:2402.01306
    apo_zero_unpaired
              desirable:   1 - s(beta rho)             undesirable:  s(beta rho)
                                                                APO, D'Oosterlinck et al. 2024, arXiv:2408.06266

``losses`` is ``[C + R]``: the desirable losses times ``desirable_weight``, then the undesirable
ones times ``undesirable_weight`` (the weights balance unequal counts; the paper keeps
``desirable_weight * C / (undesirable_weight * R)`` in [1, 4/3]). The batch loss is their mean.
Rewards are ``beta * rho``, detached. Values are TRL 1.16's KTOTrainer's for one process; with
several, TRL averages the per-process KL means before the clamp: pass that mean as ``kl``.
"""

from __future__ import annotations

import torch

from .preference import _f32

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_kl(policy_KL_logps: torch.Tensor, reference_KL_logps: torch.Tensor) -> torch.Tensor:  # noqa: N803
    """The KL estimate's unclamped batch mean ``mean(pi_KL - ref_KL)``, detached (TRL's ``kl``
    before the clamp at 0; all-reduce it over processes, then pass it to ``kto_loss``)."""
    if policy_KL_logps.shape != reference_KL_logps.shape or policy_KL_logps.dim() != 1:
        raise ValueError(f"policy_KL_logps {tuple(policy_KL_logps.shape)} and reference_KL_logps "
                         f"{tuple(reference_KL_logps.shape)} must be [K] of one size")
    return (_f32(policy_KL_logps) - _f32(reference_KL_logps)).mean().detach()


def kto_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    policy_KL_logps: torch.Tensor | None,  # noqa: N803 (TRL's name)
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    reference_KL_logps: torch.Tensor | None,  # noqa: N803
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    *,
    kl: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(losses [C + R], chosen_rewards [C], rejected_rewards [R], kl)``; see the module docstring.

    "chosen" are the desirable completions, "rejected" the undesirable ones (either may be empty).
    The KL estimate comes from ``policy_KL_logps``/``reference_KL_logps`` ``[K]``, or from ``kl``
    (an unclamped mean, e.g. averaged over processes) when given; ``apo_zero_unpaired`` uses none,
    and neither does ``kto`` when both are None (``kl`` is then 0). ``kl`` is returned clamped at
    0, detached.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(KTO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    for role, pi, ref in (("chosen", policy_chosen_logps, reference_chosen_logps),
                          ("rejected", policy_rejected_logps, reference_rejected_logps)):
        if pi.dim() != 1 or pi.shape != ref.shape:
            raise ValueError(f"policy_{role}_logps {tuple(pi.shape)} and reference_{role}_logps "
                             f"{tuple(ref.shape)} must be one [n] size")
    pi_c, pi_r = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
    rho_c, rho_r = pi_c - _f32(reference_chosen_logps).detach(), pi_r - _f32(reference_rejected_logps).detach()

    if loss_type == "apo_zero_unpaired":
        z0 = torch.zeros((), dtype=pi_c.dtype, device=pi_c.device)
    elif kl is not None:
        z0 = torch.as_tensor(kl, dtype=pi_c.dtype, device=pi_c.device).detach()
    elif policy_KL_logps is not None:
        if reference_KL_logps is None:
            raise ValueError("reference_KL_logps are required with policy_KL_logps")
        z0 = kto_kl(policy_KL_logps, reference_KL_logps).to(pi_c)
    else:
        z0 = torch.zeros((), dtype=pi_c.dtype, device=pi_c.device)
    z0 = z0.clamp(min=0)

    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (rho_c - z0))
        rejected_losses = 1 - torch.sigmoid(beta * (z0 - rho_r))
    else:  # apo_zero_unpaired
        chosen_losses = 1 - torch.sigmoid(beta * rho_c)
        rejected_losses = torch.sigmoid(beta * rho_r)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    return losses, beta * rho_c.detach(), beta * rho_r.detach(), z0

