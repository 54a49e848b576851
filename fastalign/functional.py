"""fastalign's stable functional API: the alignment math without the trainers.

Names and argument orders follow TRL 0.7.10, so code written against it ports by changing an
import; the packed and fused forms are fastalign's own. Everything here is differentiable where
the math is (advantages and rewards are not: they are targets).

Log-probs:      selective_logprobs, linear_logprobs, entropy_from_logits, get_batch_logps
Packed layout:  segment_sum, segment_mean
Preference:     dpo_loss, preference_loss, fused_preference_loss, reward_loss, LOSS_TYPES
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
from fastalign.kernels.kl import full_kl, kl_penalty
from fastalign.kernels.ppo import ppo_loss
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
    "LOSS_TYPES", "COUPLED_LOSS_TYPES",
    "kl_penalty", "full_kl", "compute_rewards", "compute_rewards_packed", "compute_advantages", "gae", "ppo_loss",
    "masked_mean", "masked_var", "masked_whiten",
    "AdaptiveKLController", "FixedKLController", "RunningMoments",
    "ddim_step_with_logprob", "ddpo_loss", "PerPromptStatTracker",
]

