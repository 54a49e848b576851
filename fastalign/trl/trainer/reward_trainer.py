"""``trl.RewardConfig`` and ``trl.RewardTrainer`` (0.7.10) on fastalign's ``RewardTrainer``.

``RewardConfig`` is, as in TRL, ``transformers.TrainingArguments`` plus ``max_length`` (and
``gradient_checkpointing`` on by default); it also takes the TRL-era ``evaluation_strategy``.
Rows are TRL's pre-tokenized ``input_ids_chosen``/``attention_mask_chosen``/
``input_ids_rejected``/``attention_mask_rejected`` (or fastalign's text pairs), with an optional
``margin``. Logged: ``loss`` and, in evaluation, ``eval_accuracy`` (TRL's ``compute_accuracy``),
plus fastalign's ``accuracy``, ``margin``, ``rewards/chosen`` and ``rewards/rejected``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import TrainingArguments

from fastalign.algorithms import reward as native
from fastalign.errors import ConfigError

from .base import TRLTrainer
from .loading import resolve
from .utils import RewardDataCollatorWithPadding


@dataclass
class RewardConfig(TrainingArguments):
    """TRL 0.7.10's ``RewardConfig``: ``TrainingArguments`` with ``max_length`` (the longest
    sequence, prompt and answer; longer pairs are truncated and counted, TRL's trainer warns) and
    ``gradient_checkpointing=True`` by default."""

    max_length: int | None = None
    gradient_checkpointing: bool = True
    evaluation_strategy: str | None = None  # TRL-era name of eval_strategy

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        super().__post_init__()


class RewardTrainer(TRLTrainer, native.RewardTrainer):
    trl_name = "RewardTrainer"

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None, tokenizer=None,
                 model_init=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 preprocess_logits_for_metrics=None, max_length=None, peft_config=None, *, max_tokens_per_batch=None):
        if data_collator is not None and not isinstance(data_collator, RewardDataCollatorWithPadding):
            raise ConfigError(f"data_collator={type(data_collator).__name__}: fastalign packs the pairs itself; give "
                              "rows with input_ids_chosen/input_ids_rejected (or chosen/rejected texts)")
        model, tokenizer = resolve(model, tokenizer, model_init, None, self.model_loader)
        if max_length is None and getattr(args, "max_length", None) is None:
            max_length = 512  # TRL's default, with a warning there
        config, _ = self._map_args(args if args is not None else RewardConfig(output_dir="tmp_trainer", report_to="none"),
                                   native.RewardConfig, max_length=max_length, max_tokens_per_batch=max_tokens_per_batch)
        if config.max_length is not None and config.max_prompt_length >= config.max_length:
            config.max_prompt_length = config.max_length // 2  # only for pairs longer than max_length
        model, peft_config, optimizers = self._optimizers(model, tokenizer, peft_config, optimizers)
        super().__init__(model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         tokenizer=tokenizer, peft_config=peft_config, optimizers=optimizers)
        self._after_init(callbacks, compute_metrics)

    def _eval_store(self, dataset):
        return self._pairs("eval", dataset, self.tokenizer, self.args)

    @torch.no_grad()
    def _predictions(self, batches) -> np.ndarray:
        """Each pair's rewards ``[chosen, rejected]``, as TRL's ``predict`` gives them."""
        out = np.zeros((len(batches.store), 2))
        for k in range(len(batches)):
            batch = batches[k]
            scores = self.score(batch)
            out[batches.plan[k]] = torch.stack([scores[batch.chosen], scores[batch.rejected]], 1).cpu().numpy()
        return out[batches.store.kept]
