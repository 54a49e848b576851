"""``GRPOTrainer``: group-relative advantages and the clipped token-level objective."""

from __future__ import annotations

import torch

from fastalign.kernels.grpo import group_advantages, group_reward_metrics

from .config import GRPOConfig
from .objective import MicroBatch, RowInputs, grpo_row
from .rollout import Scored
from .trainer import GroupTrainer


class GRPOTrainer(GroupTrainer):
    """GRPO on a causal LM, TRL 1.16's interface: ``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...),
    train_dataset=..., processing_class=tokenizer, peft_config=None)`` then ``train()``.

    ``model``: a causal LM or its name or path; ``reward_funcs``: one or a list of reward functions
    or reward models (``fastalign.algorithms.grpo.rewards``); ``train_dataset``: prompt rows (a
    ``prompt`` or ``query`` text, chat messages, or ``input_ids``; the other columns reach the
    reward functions), a file or a ``datasets.Dataset``. Beyond TRL: ``ref_model`` (a separate
    reference; default a frozen copy of the model, or with PEFT the model with its adapters off;
    none at all when ``beta`` is 0) and ``generator`` (any ``Generator``; default the model's own
    ``generate``).

    Each generation: ``generation_batch_size / num_generations`` prompts, ``num_generations``
    completions each; rewards summed with ``reward_weights``; advantages ``group_advantages``
    (``scale_rewards``); then the clipped objective with the k3 KL to the reference (``beta``),
    aggregated by ``loss_type``, over packed rows.
    """

    config_class = GRPOConfig

    def advantages(self, scored: Scored) -> tuple[torch.Tensor, dict]:
        c = self.args
        rewards = self.rewards.combined(scored.rewards)
        advantages = group_advantages(rewards, c.num_generations, c.scale_rewards)
        metrics = group_reward_metrics(rewards, c.num_generations, c.scale_rewards)
        return advantages[scored.local], {k: float(v) for k, v in metrics.items()}

    def row_loss(self, row: RowInputs, micro: MicroBatch, num_items: float) -> tuple[torch.Tensor, dict]:
        return grpo_row(row, micro, self.args, num_items)
