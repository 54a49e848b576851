"""Reward modeling on the packed core (Ouyang et al., "Training language models to follow
instructions with human feedback", 2022).

The model is a sequence classifier with one label (``AutoModelForSequenceClassification``), or a
causal LM whose body gets a fresh scalar head. Both halves of every pair of a micro-batch run in
one padding-free forward; the head runs only at each sequence's last token, giving the rewards
``r_c`` and ``r_r``. The loss per pair is

    -log sigmoid(r_c - r_r - margin)  +  center_rewards_coefficient * (r_c + r_r)^2

with ``margin`` from the dataset's ``margin`` column (0 without one) and the second term, reward
centering (Eisenstein et al., 2023), only when the coefficient is set. Logged: loss, accuracy (the
fraction of pairs whose chosen scores higher), margin (mean ``r_c - r_r``), rewards/chosen and
rewards/rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.data import PackedBatch
from fastalign.kernels import reward_loss
from fastalign.models import eval_mode, load_reward_model, packed_scores, prepare_model
from fastalign.options import option

from .launch import PACKED_KEYS, launch_packed
from .pairs import PairDataConfig, PairTrainer


@dataclass
class RewardConfig(PairDataConfig):
    learning_rate: float = 5e-5
    max_prompt_length: int | None = 256
    center_rewards_coefficient: float | None = option(None, "weight of the (r_c + r_r)^2 term that centres rewards "
                                                      "on 0 (null: off)", ge=0)


class RewardTrainer(PairTrainer):
    model_loader = staticmethod(load_reward_model)
    peft_task_type = "SEQ_CLS"
    run_keys = PACKED_KEYS
    launch = classmethod(launch_packed)

    def __init__(self, model, args: RewardConfig | None = None, train_dataset=None, eval_dataset=None,
                 tokenizer=None, peft_config=None, optimizers=(None, None)):
        args = args or RewardConfig()
        model, tokenizer, self.attention = prepare_model(model, tokenizer, peft_config, self.model_loader)
        if model.config.pad_token_id is None:  # transformers' own classifier forward needs it
            model.config.pad_token_id = tokenizer.pad_token_id
        train, evals = self._datasets(args, train_dataset, eval_dataset, tokenizer)
        super().__init__(model, args, train, evals, tokenizer, optimizers)

    def compute_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        scores = packed_scores(self.model, batch)
        r_c, r_r = scores[batch.chosen], scores[batch.rejected]
        margin = batch.extras["margin"][batch.chosen] if "margin" in batch.extras else None
        n = batch.chosen.numel()
        loss_sum = reward_loss(r_c, r_r, margin, self.args.center_rewards_coefficient) * n
        r_c, r_r = r_c.detach(), r_r.detach()
        return loss_sum, {
            "accuracy": (r_c > r_r).sum(), "margin": (r_c - r_r).sum(),
            "rewards/chosen": r_c.sum(), "rewards/rejected": r_r.sum(),
        }

    @torch.no_grad()
    def score(self, batch: PackedBatch) -> torch.Tensor:
        """The rewards ``[S]`` of a packed batch's sequences (eval mode)."""
        with eval_mode(self.model):
            return self.engine.forward(packed_scores, self.model, batch.to(self.engine.device))
