"""``RLOOTrainer``: leave-one-out advantages on rewards that carry the KL penalty, and TRL 1.16's
clipped objective on each completion's summed log-prob."""

from __future__ import annotations

import torch

from fastalign.engine import distributed
from fastalign.kernels import segment_sum
from fastalign.kernels.grpo import group_reward_metrics, rloo_advantages

from .config import RLOOConfig
from .objective import MicroBatch, RowInputs, rloo_row
from .rollout import Scored, gather_rows
from .trainer import GroupTrainer


class RLOOTrainer(GroupTrainer):
    """RLOO on a causal LM, TRL 1.16's interface (the same arguments as ``GRPOTrainer``, with an
    ``RLOOConfig``).

    Each completion's reward is the weighted sum of its reward functions (clipped to
    ``reward_clip_range``), minus ``beta`` times its summed log-ratio to the reference,
    ``sum_t (old_t - ref_t)`` (the first-order estimate, as TRL's RLOO: it can be negative per
    token); its advantage is that reward minus the mean of the other completions of its prompt
    (``rloo_advantages``, normalised over the generation with ``normalize_advantages``). The loss
    is the clipped ratio of summed completion log-probs, averaged over completions (``rloo_loss``).
    The sampling policy's log-probs are always recorded: the KL and the ratio need them.
    """

    config_class = RLOOConfig

    @property
    def needs_old_logprobs(self) -> bool:
        return True

    def advantages(self, scored: Scored) -> tuple[torch.Tensor, dict]:
        c, device = self.args, self.engine.device
        raw = self.rewards.combined(scored.rewards)
        rewards = raw if c.reward_clip_range is None else raw.clamp(*c.reward_clip_range)
        metrics = {}
        if c.beta != 0.0:
            per_token = (scored.old_logprobs - scored.ref_logprobs) * scored.mask
            kl = segment_sum(per_token, cu_seqlens=scored.layout.cu)
            rewards = rewards - c.beta * gather_rows(kl.unsqueeze(1))[:, 0]
            total, count = distributed.all_reduce_sum([float(per_token.sum()), float(scored.mask.sum())], device)
            metrics["kl"] = total / max(count, 1.0)
        advantages = rloo_advantages(rewards, c.num_generations, c.normalize_advantages)
        shown = {k: float(v) for k, v in group_reward_metrics(raw, c.num_generations).items()}
        shown["frac_reward_zero_std"] = float(group_reward_metrics(rewards, c.num_generations)["frac_reward_zero_std"])
        return advantages[scored.local], {**shown, **metrics}

    def row_loss(self, row: RowInputs, micro: MicroBatch, num_items: float) -> tuple[torch.Tensor, dict]:
        return rloo_row(row, micro, self.args, num_items)
