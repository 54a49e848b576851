"""fastalign's stable functional API: the alignment math without the trainers.

Names and argument orders follow TRL 0.7.10, so code written against it ports by changing an
import; the packed and fused forms are fastalign's own. Everything here is differentiable where
the math is (advantages and rewards are not: they are targets).

Log-probs:      selective_logprobs, linear_logprobs, entropy_from_logits, get_batch_logps
Packed layout:  segment_sum, segment_mean
Preference:     dpo_loss, preference_loss, fused_preference_loss, reward_loss, LOSS_TYPES
No reference:   odds_ratio_loss (ORPO), cpo_loss (CPO, SimPO, AlphaPO), simpo_loss,
                REFERENCE_FREE_LOSS_TYPES; the NLL term: fused_preference_loss(nll_coef=...)
Unpaired:       kto_loss, kto_kl (KTO, unpaired APO-zero)
GRPO / RLOO:    group_advantages, rloo_advantages, group_reward_metrics, grpo_loss,
                grpo_loss_packed, rloo_loss
RL (PPO):       kl_penalty, full_kl, compute_rewards, compute_rewards_packed, compute_advantages,
                gae, ppo_loss, masked_mean, masked_var, masked_whiten, AdaptiveKLController,
                FixedKLController, RunningMoments
DDPO:           ddim_step_with_logprob, ddpo_loss, PerPromptStatTracker
"""

from __future__ import annotations

import torch

from fastalign.kernels import (
    COUPLED_LOSS_TYPES,
    LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    PreferenceLossOutput,
    entropy_from_logits,
    fused_preference_loss,
    linear_logprobs,
    preference_loss,
    reward_loss,
    segment_mean,
    segment_sum,
    selective_logprobs,
)
from fastalign.kernels.ddpo import ddim_step_with_logprob, ddpo_loss
from fastalign.kernels.gae import compute_advantages, gae
from fastalign.kernels.grpo import (
    group_advantages,
    group_reward_metrics,
    grpo_loss,
    grpo_loss_packed,
    rloo_advantages,
    rloo_loss,
)
from fastalign.kernels.kl import full_kl, kl_penalty
from fastalign.kernels.kto import kto_kl, kto_loss
from fastalign.kernels.ppo import ppo_loss
from fastalign.kernels.preference import log_odds_ratio
from fastalign.kernels.rl import (
    AdaptiveKLController,
    FixedKLController,
    PerPromptStatTracker,
    RunningMoments,
    masked_mean,
    masked_var,
    masked_whiten,
)
from fastalign.kernels.shaping import compute_rewards, compute_rewards_packed


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    **loss_options: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(losses, chosen_rewards, rejected_rewards)`` for every DPO-family ``loss_type``.

    TRL 0.7.10's ``DPOTrainer.dpo_loss`` as a function; ``reference_free=True`` takes the reference
    log-probs as 0 (they may be None). See ``fastalign.kernels.preference`` for each formula.
    """
    return preference_loss(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta, loss_type, label_smoothing, reference_free, **loss_options,
    )


def odds_ratio_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term, TRL's ``ORPOTrainer.odds_ratio_loss``: ``(losses, chosen_rewards,
    rejected_rewards, mean log s(log_odds), mean log_odds)``.

    From the policy's mean log-probs per token ``[P]``, with ``odds(y) = p(y) / (1 - p(y))``:
    ``log_odds = log odds(y_c) - log odds(y_r)`` and ``losses = beta * log s(log_odds)``, which
    ORPO maximises: the objective is ``nll_chosen - mean(losses)`` (Hong et al. 2024,
    arXiv:2403.07691, eqs. 4-7; ``beta`` is its lambda). ``preference_loss(loss_type="orpo")``
    holds the same term with the minimised sign, ``-losses``. Rewards ``beta * logps``, detached.
    """
    pi_c, pi_r = policy_chosen_logps.float(), policy_rejected_logps.float()
    log_odds = log_odds_ratio(pi_c, pi_r)
    ratio = torch.nn.functional.logsigmoid(log_odds)
    return beta * ratio, beta * pi_c.detach(), beta * pi_r.detach(), ratio.mean(), log_odds.mean()


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(losses, chosen_rewards, rejected_rewards)`` of TRL's ``CPOTrainer.cpo_loss``: the DPO
    family without a reference (CPO, Xu et al. 2024, arXiv:2401.08417).

    With ``h = r_c - r_r`` and ``r = logps`` (or, with ``alpha != 0``, AlphaPO's
    ``r = (1 - p^-alpha) / alpha``, ``p = e^logps``; Gupta et al. 2025, arXiv:2501.03884):
    ``sigmoid`` ``-(1-eps) log s(beta h) - eps log s(-beta h)``; ``hinge`` ``relu(1 - beta h)``;
    ``ipo`` ``(h - 1/(2 beta))^2``; ``simpo`` the sigmoid loss of ``beta h - simpo_gamma``
    (SimPO, Meng et al. 2024, arXiv:2405.14734). Rewards ``beta * r``, detached. CPO's full
    objective adds ``cpo_alpha`` times the chosen completions' NLL (``fused_preference_loss``'s
    ``nll_coef``); TRL feeds summed log-probs, means for ``ipo`` and ``simpo``.
    """
    if loss_type not in ("sigmoid", "hinge", "ipo", "simpo"):
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected sigmoid, hinge, ipo or simpo")
    pi_c, pi_r = policy_chosen_logps, policy_rejected_logps
    if alpha != 0.0:
        pi_c, pi_r = (-torch.expm1(-alpha * x.float()) / alpha for x in (pi_c, pi_r))
    return preference_loss(pi_c, pi_r, None, None, beta, loss_type, label_smoothing, True, simpo_gamma=simpo_gamma)


def simpo_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, beta: float = 2.0,
    simpo_gamma: float = 0.5, label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, arXiv:2405.14734): ``(losses, chosen_rewards, rejected_rewards)``
    with ``losses = -log s(beta (pi_c - pi_r) - simpo_gamma)`` (label-smoothed as ``sigmoid``)
    on mean log-probs per token ``[P]``; rewards ``beta * pi``. ``cpo_loss(loss_type="simpo")``
    with the paper's default ``beta``."""
    return cpo_loss(policy_chosen_logps, policy_rejected_logps, beta, "simpo", label_smoothing, simpo_gamma)


def get_batch_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    average_log_prob: bool = False,
    label_pad_token_id: int = -100,
    is_encoder_decoder: bool = False,
) -> torch.Tensor:
    """Per-sequence log-probs ``[B]`` of a padded batch: sums, or means over the label tokens.

    ``logits [B, T, V]``, ``labels [B, T]`` with ``label_pad_token_id`` where no loss is taken.
    Decoder-only models predict token t+1 at position t, so logits and labels are shifted by one
    (not for encoder-decoder models). A row with no label token gets 0 (TRL 0.7.10 divided 0 by 0).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must agree on [B, T]")
    if not is_encoder_decoder:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    per_token = selective_logprobs(logits, labels, ignore_index=label_pad_token_id)
    total = per_token.sum(-1)
    if not average_log_prob:
        return total
    return total / (labels != label_pad_token_id).sum(-1).clamp(min=1)


__all__ = [
    "selective_logprobs", "linear_logprobs", "entropy_from_logits", "get_batch_logps",
    "segment_sum", "segment_mean",
    "dpo_loss", "preference_loss", "fused_preference_loss", "PreferenceLossOutput", "reward_loss",
    "LOSS_TYPES", "COUPLED_LOSS_TYPES", "REFERENCE_FREE_LOSS_TYPES",
    "odds_ratio_loss", "cpo_loss", "simpo_loss", "kto_loss", "kto_kl",
    "group_advantages", "rloo_advantages", "group_reward_metrics", "grpo_loss", "grpo_loss_packed", "rloo_loss",
    "kl_penalty", "full_kl", "compute_rewards", "compute_rewards_packed", "compute_advantages", "gae", "ppo_loss",
    "masked_mean", "masked_var", "masked_whiten",
    "AdaptiveKLController", "FixedKLController", "RunningMoments",
    "ddim_step_with_logprob", "ddpo_loss", "PerPromptStatTracker",
]

