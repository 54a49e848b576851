"""What TRL's Trainer-based trainers (SFT, reward, DPO) share on top of the native trainers: the
``TrainingArguments`` they take, the token budget from row counts, TRL's metric names, the
``state.log_history`` and callbacks, ``TrainOutput``, ``evaluate``/``predict``, saving and the Hub.

Metric names are transformers' and TRL's: ``learning_rate`` (fastalign's ``lr``), evaluation
metrics prefixed ``eval_`` (fastalign's ``eval/``); every other fastalign metric (tokens/s, peak
memory, grad_norm, ...) is kept under its own name. The same names go to ``metrics.jsonl``,
TensorBoard, ``state.log_history`` and the callbacks' ``on_log``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerControl, TrainerState
from transformers.trainer_utils import EvalPrediction, PredictionOutput, TrainOutput

from fastalign.engine import distributed
from fastalign.engine.metrics import METRICS_FILE
from fastalign.errors import ConfigError
from fastalign.models import prepare_model
from fastalign.trl.args import Mapped, default_arguments, map_training_arguments, optimizer_for, rows_to_tokens

RENAMES = {"lr": "learning_rate"}


def trl_names(metrics: dict, prefix: str = "eval") -> dict:
    """fastalign's metric names as transformers logs them (``lr`` -> ``learning_rate``,
    ``eval/x`` -> ``{prefix}_x``)."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("eval/"):
            key = f"{prefix}_{key[len('eval/'):]}"
        out[RENAMES.get(key, key)] = value
    return out


def hub_error(what: str, output_dir) -> ConfigError:
    return ConfigError(f"push_to_hub: the Hugging Face Hub cannot be reached, nothing was pushed ({what} is saved in "
                       f"{output_dir})")


def push_folder(folder, repo_id: str | None, token=None, private=None, commit_message="End of training") -> str:
    """Upload ``folder`` to the Hub as ``repo_id``; one ``ConfigError`` line when the Hub cannot be
    reached (or ``HF_HUB_OFFLINE=1``)."""
    from fastalign.data.hub import hub_reachable

    if not repo_id:
        raise ConfigError("push_to_hub: give a repo id (hub_model_id, or the first argument)")
    if not hub_reachable():
        raise hub_error("the model", folder)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message))


def write_model_card(output_dir, model_name: str, trainer: str, base_model=None, dataset_name=None, tags=()) -> Path:
    """A small README.md model card beside the saved model."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    tags = ["trl", "fastalign", *tags]
    front = "\n".join(["---", "library_name: transformers", "tags:", *[f"- {t}" for t in tags], "---"])
    lines = [front, "", f"# {model_name}", "", f"Trained with fastalign's `{trainer}` (a TRL 0.7.10 drop-in, "
             "`fastalign.trl`)."]
    if base_model:
        lines.append(f"\nBase model: `{base_model}`.")
    if dataset_name:
        lines.append(f"\nData set: `{dataset_name}`.")
    path.write_text("\n".join(lines) + "\n")
    return path


class TRLTrainer:
    """Mixed in before a native trainer (``class SFTTrainer(TRLTrainer, native.SFTTrainer)``)."""

    trl_name = "Trainer"

    # ---- construction helpers ------------------------------------------------------------------
    def _map_args(self, args, native_cls, **trainer_kwargs) -> tuple[object, Mapped]:
        """The native config for ``args`` (a ``TrainingArguments``, None for transformers' defaults,
        or already a native config) plus the TRL constructor's own options (``None``: not given)."""
        self.training_args = args if args is not None else default_arguments()
        fields = {f for f in native_cls.__dataclass_fields__}
        if isinstance(args, native_cls):
            mapped = Mapped({})
            config = args
        else:
            mapped = map_training_arguments(self.training_args, fields)
            config = native_cls(**mapped.fields)
        for key, value in trainer_kwargs.items():
            if value is not None:
                setattr(config, key, value)
        if trainer_kwargs.get("max_tokens_per_batch") is not None:
            mapped.rows.train = mapped.rows.eval = None  # a token budget given: it stands
        self._mapped = mapped
        self.state = TrainerState()
        self.control = TrainerControl()
        return config, mapped

    def _optimizers(self, model, tokenizer, peft_config, optimizers):
        """``(model, peft_config, optimizers)``: as given, or with transformers' ``optim`` built when
        it is not AdamW (the model is loaded and LoRA applied first, so it sees the trained weights)."""
        if optimizers[0] is not None or self._mapped.optimizer is None:
            return model, peft_config, optimizers
        model, _, _ = prepare_model(model, tokenizer, peft_config, self.model_loader)
        return model, None, (optimizer_for(self._mapped.optimizer, self.training_args, model), optimizers[1])

    def plan(self, store):
        """The native plan, with TRL's row count turned into a token budget for this data set:
        ``per_device_train_batch_size x its longest unit`` (a unit: a row, or a pair's two halves).
        Evaluation sets are planned the same way (their means are exact whatever the batches)."""
        rows = self._mapped.rows.train
        if rows and len(store.kept):
            longest = int(store.lengths[store.kept].max())
            self.args.max_tokens_per_batch = rows_to_tokens(rows, longest)
        return super().plan(store)

    def _after_init(self, callbacks=None, compute_metrics=None):
        self.callbacks = list(callbacks or [])
        self.compute_metrics = compute_metrics
        self.state.max_steps = self.num_training_steps
        self.state.num_train_epochs = self.args.num_train_epochs
        if self._mapped.eval_per_epoch and self.steps_per_epoch:
            self.args.eval_steps = self.steps_per_epoch
        if self._mapped.save_per_epoch and self.steps_per_epoch:
            self.args.save_steps = self.steps_per_epoch
        self._epoch_hooked = False

    # ---- logging ---------------------------------------------------------------------------------
    def _callback(self, event: str, **kwargs) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self.training_args, self.state, self.control, model=self.model, tokenizer=self.tokenizer, **kwargs)

    def _on_log(self, step: int, metrics: dict) -> None:
        self.state.global_step = step
        if "epoch" in metrics:
            self.state.epoch = metrics["epoch"]
        self.state.log_history.append({**metrics, "step": step})
        self._callback("on_log", logs=dict(metrics))

    def _hook_logger(self) -> None:
        logger = self.logger
        if logger is None or getattr(logger, "_trl_hooked", False):
            return
        log = logger.log

        def hooked(step, metrics):
            log(step, metrics)
            self._on_log(step, {k: float(v) if hasattr(v, "item") else v for k, v in metrics.items()})

        logger.log, logger._trl_hooked = hooked, True

    def train_step(self, step: int) -> dict:
        self._hook_logger()
        metrics = trl_names(super().train_step(step))
        if step == 0 and self._mapped.logging_first_step and self.args.logging_steps > 1 and self.logger is not None:
            self.logger.log(1, metrics)  # TRL's logging_first_step; the first window still counts it
        self._callback("on_step_end")
        return metrics

    # ---- the run ---------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs) -> TrainOutput:
        """The native run, returning transformers' ``TrainOutput(global_step, training_loss,
        metrics)``; ``state.log_history`` holds every logged record and the run's summary."""
        if resume_from_checkpoint is not None:
            self.args.resume_from_checkpoint = resume_from_checkpoint
        self._callback("on_train_begin")
        began = time.perf_counter()
        out = super().train()
        runtime = time.perf_counter() - began
        steps = max(int(out.get("steps", self.num_training_steps)), 1)
        samples = self._train_rows() * (steps / max(self.steps_per_epoch or steps, 1))
        metrics = {"train_runtime": runtime, "train_samples_per_second": samples / runtime,
                   "train_steps_per_second": steps / runtime, "total_flos": 0.0, "train_loss": out["train_loss"],
                   "epoch": self.global_step / self.steps_per_epoch if self.steps_per_epoch else 0.0}
        self.state.global_step = self.global_step
        self.state.epoch = metrics["epoch"]
        self.state.log_history.append({**metrics, "step": self.global_step})
        if distributed.is_main():  # transformers logs the run's summary like any record
            with open(Path(self.args.output_dir) / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": self.global_step, **metrics}) + "\n")
        self._callback("on_train_end")
        if self._mapped.push_to_hub:
            self.push_to_hub()
        return TrainOutput(self.global_step, out["train_loss"], metrics)

    def _train_rows(self) -> int:
        return 0 if self.streamed else len(self.train_batches.store.kept)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The evaluation set's (or ``eval_dataset``'s) exact means under TRL's names
        (``eval_loss``, ``eval_rewards/chosen``, ...), plus ``compute_metrics``' when given."""
        began = time.perf_counter()
        saved = batches = self.eval_batches
        if eval_dataset is not None:
            batches = self.eval_batches = self.make_batches(self._eval_store(eval_dataset))
        try:
            out = trl_names(super().evaluate(), metric_key_prefix)
            if self.compute_metrics is not None and batches:
                preds = self._predictions(batches)
                extra = self.compute_metrics(EvalPrediction(predictions=preds, label_ids=np.zeros(len(preds))))
                out.update({f"{metric_key_prefix}_{k}": v for k, v in extra.items()})
        finally:
            self.eval_batches = saved
        if out:
            seconds = time.perf_counter() - began
            out[f"{metric_key_prefix}_runtime"] = seconds
            out[f"{metric_key_prefix}_samples_per_second"] = len(batches.store.kept) / seconds
            out[f"{metric_key_prefix}_steps_per_second"] = len(batches) / seconds
            if self.logger is None:  # called by hand: record it like transformers does
                self._on_log(self.global_step, out)
            self._callback("on_evaluate", metrics=out)
        return out

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        """``PredictionOutput(predictions, label_ids, metrics)`` on ``test_dataset``: the trainer's
        per-row predictions (``_predictions``) and its evaluation metrics prefixed ``test_``."""
        batches = self.make_batches(self._eval_store(test_dataset))
        saved, self.eval_batches = self.eval_batches, batches
        try:
            metrics = trl_names(super().evaluate(), metric_key_prefix)
        finally:
            self.eval_batches = saved
        preds = self._predictions(batches)
        return PredictionOutput(predictions=preds, label_ids=np.zeros(len(preds)), metrics=metrics)

    def _eval_store(self, dataset):
        raise NotImplementedError

    @torch.no_grad()
    def _predictions(self, batches) -> np.ndarray:
        raise NotImplementedError

    # ---- saving and the Hub ----------------------------------------------------------------------
    def save_model(self, output_dir=None, _internal_call: bool = False) -> None:
        super().save_model(output_dir or self.args.output_dir)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        """A README.md model card in ``output_dir``."""
        base = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        return write_model_card(self.args.output_dir, model_name or Path(self.args.output_dir).name, self.trl_name,
                                base, dataset_name, tags or ())

    def push_to_hub(self, commit_message: str = "End of training", blocking: bool = True, **kwargs) -> str:
        """Save the model to ``output_dir``, then upload it (``hub_model_id``, or the folder's name);
        one clear ``ConfigError`` when the Hub cannot be reached."""
        self.save_model(self.args.output_dir)
        self.create_model_card()
        repo = self._mapped.hub_model_id or kwargs.get("repo_id") or Path(self.args.output_dir).name
        return push_folder(self.args.output_dir, repo, self._mapped.hub_token, kwargs.get("private"), commit_message)
