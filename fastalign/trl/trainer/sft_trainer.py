"""``trl.SFTTrainer`` (0.7.10's signature) on fastalign's ``SFTTrainer``.

- ``max_seq_length`` is ``max_length`` (TRL's default: ``min(tokenizer.model_max_length, 1024)``);
  rows longer than it are cut (counted), as TRL cuts them.
- ``packing``: either way rows are packed padding-free, each row its own sequence (positions
  restarting, no attention across rows), ``per_device_train_batch_size`` rows or more per
  micro-batch (see ``fastalign.trl.args``). TRL's ``packing=True`` instead concatenates texts and
  cuts them into ``max_seq_length`` chunks that attend across documents; that is not reproduced.
  ``packing`` only decides how ``formatting_func`` is called: on a batch (a dict of lists,
  returning a list of strings; ``packing=False``, TRL's default) or on one row (returning a string).
- The loss is on every token of a row (TRL's default collator), or only after the response
  template with ``data_collator=DataCollatorForCompletionOnlyLM(...)``.
- A text row ends with the end-of-sequence token, so the model learns to stop (TRL's unpacked
  rows end without one unless the tokenizer adds it); rows read through
  ``DataCollatorForCompletionOnlyLM`` are tokenized as TRL tokenizes them, without it.
- An encoder-decoder model (T5, BART) runs padded: a text row is both the encoder's input and the
  decoder's target, as TRL's collator (``labels = input_ids``) makes it for a seq2seq model; a row
  with a no-loss prefix (the completion-only collator's, or prompt/completion rows) gives that
  prefix to the encoder and the rest to the decoder.
"""

from __future__ import annotations

import warnings

import datasets
import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling

from fastalign.algorithms import sft as native
from fastalign.errors import ConfigError
from fastalign.models import batch_sequence_logprobs, eval_mode

from .base import TRLTrainer
from .loading import resolve
from .utils import DataCollatorForCompletionOnlyLM


class BatchedFormatting:
    """A batched ``formatting_func`` (a dict of lists -> a list of strings) called on one row."""

    def __init__(self, func):
        self.func = func

    def __call__(self, row: dict) -> str:
        out = self.func({k: [v] for k, v in row.items()})
        if not isinstance(out, list):
            raise ValueError("The `formatting_func` should return a list of processed strings since it can lead to "
                             "silent bugs.")
        return out[0]


def completion_rows(dataset, collator: DataCollatorForCompletionOnlyLM, text, max_length: int | None):
    """Rows of ``input_ids`` and ``labels`` (-100 before each response): the collator's masking done
    once, before packing. ``text(row) -> str`` reads a row's text."""
    tokenizer = collator.tokenizer

    def encode(row: dict) -> dict:
        ids = tokenizer(text(row), add_special_tokens=True, truncation=max_length is not None,
                        max_length=max_length)["input_ids"]
        labels = collator.mask_labels(ids)
        if all(label == collator.ignore_index for label in labels):
            warnings.warn(f"could not find the response template {collator.response_template!r} in a row: it carries "
                          "no loss and is dropped", stacklevel=2)
        return {"input_ids": ids, "labels": labels}

    if isinstance(dataset, datasets.Dataset):
        return dataset.map(encode, remove_columns=dataset.column_names, desc="completion-only labels")
    return [encode(row) for row in dataset]


class SFTTrainer(TRLTrainer, native.SFTTrainer):
    trl_name = "SFTTrainer"

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None, tokenizer=None,
                 model_init=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 preprocess_logits_for_metrics=None, peft_config=None, dataset_text_field=None, packing=False,
                 formatting_func=None, max_seq_length=None, infinite=None, num_of_sequences=1024, chars_per_token=3.6,
                 dataset_num_proc=None, dataset_batch_size=1000, neftune_noise_alpha=None, model_init_kwargs=None,
                 dataset_kwargs=None, *, max_tokens_per_batch=None):
        model, tokenizer = resolve(model, tokenizer, model_init, model_init_kwargs, self.model_loader)
        if max_seq_length is None:
            max_seq_length = min(getattr(tokenizer, "model_max_length", 1024) or 1024, 1024)
        config, _ = self._map_args(args, native.SFTConfig, max_length=max_seq_length,
                                   dataset_text_field=dataset_text_field, neftune_noise_alpha=neftune_noise_alpha,
                                   dataset_num_proc=dataset_num_proc, max_tokens_per_batch=max_tokens_per_batch)
        config.packing, config.completion_only_loss = True, False  # TRL: every token of a row, no chunks
        dataset_kwargs = dict(dataset_kwargs or {})
        if dataset_kwargs.pop("add_special_tokens", True) is False:
            warnings.warn("dataset_kwargs add_special_tokens=False is ignored: rows are tokenized with special tokens",
                          stacklevel=2)
        dataset_kwargs.pop("skip_prepare_dataset", None)  # tokenized rows (input_ids) are read as they are
        if dataset_kwargs:
            warnings.warn(f"dataset_kwargs {sorted(dataset_kwargs)} are ignored by fastalign", stacklevel=2)
        if formatting_func is not None and not packing:
            formatting_func = BatchedFormatting(formatting_func)
        if isinstance(data_collator, DataCollatorForCompletionOnlyLM):
            def text(row):
                return formatting_func(row) if formatting_func else row[dataset_text_field or "text"]

            train_dataset = completion_rows(train_dataset, data_collator, text, max_seq_length)
            if eval_dataset is not None:
                eval_dataset = completion_rows(eval_dataset, data_collator, text, max_seq_length)
            formatting_func = None
        elif data_collator is not None and not (isinstance(data_collator, DataCollatorForLanguageModeling)
                                                and not data_collator.mlm):
            raise ConfigError(f"data_collator={type(data_collator).__name__}: fastalign packs rows itself; give rows "
                              "with input_ids and labels (-100: no loss), or DataCollatorForCompletionOnlyLM")
        self._formatting_func = formatting_func
        model, peft_config, optimizers = self._optimizers(model, tokenizer, peft_config, optimizers)
        super().__init__(model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         tokenizer=tokenizer, peft_config=peft_config, formatting_func=formatting_func,
                         optimizers=optimizers)
        self._after_init(callbacks, compute_metrics)

    def _eval_store(self, dataset):
        return self._store("eval", dataset, self.tokenizer, self.args, self._formatting_func)

    @torch.no_grad()
    def _predictions(self, batches) -> np.ndarray:
        """Each row's summed log-prob of its loss tokens (TRL returns the logits, never built here)."""
        out = np.zeros(len(batches.store))
        with eval_mode(self.model):
            for k in range(len(batches)):
                batch = batches[k].to(self.engine.device)
                with self.engine.autocast():
                    logps = batch_sequence_logprobs(self.model, batch, average=False)
                out[batches.plan[k]] = logps.double().cpu().numpy()
        return out[batches.store.kept]
