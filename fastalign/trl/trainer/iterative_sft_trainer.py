"""``trl.IterativeSFTTrainer`` (0.7.10's signature) on fastalign's ``IterativeSFTTrainer``.

``args`` is a ``TrainingArguments`` (default: transformers' defaults); its
``per_device_train_batch_size`` rows make a mini-batch and ``gradient_accumulation_steps`` of them
an optimizer step, as in TRL. Without ``max_steps`` the learning rate is constant after the
warmup (TRL 0.7.10 refuses to run without ``max_steps``). ``IterativeSFTTrainer(model, tokenizer)``,
as TRL's docs write it, takes the tokenizer given in the ``args`` place. ``step`` returns its stats
and logs ``loss`` and ``learning_rate`` (plus fastalign's) to ``state.log_history`` and
``metrics.jsonl``; ``evaluate(eval_dataset)`` gives ``eval_loss``. The differences from TRL (labels
and ``texts_labels`` are used, truncation cuts sequences, not the batch) are in the native docs.
"""

from __future__ import annotations

import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase, TrainerControl, TrainerState

from fastalign.algorithms import iterative_sft as native
from fastalign.data import load_rows
from fastalign.errors import ConfigError
from fastalign.models import eval_mode
from fastalign.trl.args import default_arguments, map_training_arguments

from .base import push_folder, trl_names, write_model_card
from .loading import resolve


class IterativeSFTTrainer(native.IterativeSFTTrainer):
    def __init__(self, model=None, args=None, tokenizer=None, optimizers=(None, None), data_collator=None,
                 eval_dataset=None, max_length=None, truncation_mode="keep_end", preprocess_logits_for_metrics=None,
                 compute_metrics=None, optimize_device_cache=False, *, peft_config=None):
        if isinstance(args, PreTrainedTokenizerBase) and tokenizer is None:
            args, tokenizer = None, args  # IterativeSFTTrainer(model, tokenizer), as TRL's docs call it
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise NotImplementedError("fastalign.trl: encoder-decoder models (T5, BART) are not supported yet; "
                                      "IterativeSFTTrainer takes decoder-only causal LMs")
        if data_collator is not None and not (isinstance(data_collator, DataCollatorForLanguageModeling)
                                              and not data_collator.mlm):
            raise ConfigError(f"data_collator={type(data_collator).__name__}: fastalign packs rows itself; give "
                              "labels (-100: no loss) or texts_labels to step()")
        model, tokenizer = resolve(model, tokenizer)
        self.training_args = args if args is not None else default_arguments()
        if isinstance(self.training_args, native.IterativeSFTConfig):
            config, self._mapped = self.training_args, None
        else:
            self._mapped = map_training_arguments(self.training_args, set(native.IterativeSFTConfig.__dataclass_fields__))
            config = native.IterativeSFTConfig(**self._mapped.fields)
            config.per_device_train_batch_size = self._mapped.rows.train
        self.state, self.control = TrainerState(), TrainerControl()
        self.eval_dataset, self.compute_metrics = eval_dataset, compute_metrics
        super().__init__(model, config, tokenizer, optimizers, None, max_length, truncation_mode,
                         peft_config=peft_config)

    def step(self, input_ids=None, attention_mask=None, labels=None, texts=None, texts_labels=None) -> dict:
        stats = super().step(input_ids, attention_mask, labels, texts, texts_labels)
        self.state.global_step = self.global_step
        self.state.log_history.append({**stats, "step": self.global_step})
        if self.args.eval_steps and self.eval_dataset is not None and self.global_step % self.args.eval_steps == 0:
            self.evaluate()
        return stats

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The mean loss per target token over ``eval_dataset`` (rows of ``input_ids`` with optional
        ``attention_mask`` and ``labels``, or ``text``), logged as ``eval_loss``."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate: give an eval_dataset (here or to the trainer)")
        rows = list(load_rows(dataset)) if isinstance(dataset, str) else [dict(r) for r in dataset]
        if rows and "input_ids" in rows[0]:
            made = self._rows([r["input_ids"] for r in rows],
                              [r["attention_mask"] for r in rows] if "attention_mask" in rows[0] else None,
                              [r["labels"] for r in rows] if "labels" in rows[0] else None, None, None)
        else:
            made = self._rows(None, None, None, [r.get("text") or r.get("texts") for r in rows], None)
        self._truncate(made)
        kept = [r for r in made if r.loss_tokens > 0]
        if not kept:
            raise ValueError("evaluate: no row has a target token")
        with eval_mode(self.model):
            sums = self._pass([(b, True) for b in self._micro_batches(kept)])
        metrics = trl_names({"eval/loss": sums["_loss"] / sums["_weight"]}, metric_key_prefix)
        self.logger.log(self.global_step, metrics)
        self.state.log_history.append({**metrics, "step": self.global_step})
        return metrics

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        base = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        return write_model_card(self.args.output_dir, model_name or "model", "IterativeSFTTrainer", base, dataset_name,
                                tags or ())

    def push_to_hub(self, commit_message: str = "End of training", **kwargs) -> str:
        self.save_model(self.args.output_dir)
        self.create_model_card()
        repo = (self._mapped.hub_model_id if self._mapped else None) or kwargs.get("repo_id")
        return push_folder(self.args.output_dir, repo or "model", kwargs.get("token"), None, commit_message)

    def save_model(self, output_dir=None, _internal_call: bool = False) -> None:
        super().save_model(output_dir or self.args.output_dir)
