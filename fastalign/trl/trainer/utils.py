"""``trl.trainer.utils``: collators, statistics and helpers under TRL 0.7.10's names.

The collators are what TRL's trainers take; fastalign packs rows itself, so a trainer reads
from them what they mean (which tokens carry the loss) rather than calling them. They still
work as plain collators (padded batches) for code that calls them directly.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling

from fastalign.algorithms.dpo import disable_dropout as disable_dropout_in_model
from fastalign.kernels.rl import AdaptiveKLController, FixedKLController, PerPromptStatTracker
from fastalign.kernels.rl import RunningMoments as _RunningMoments

IGNORE_INDEX = -100


def _find(ids: list[int], pattern: list[int], start: int = 0) -> int:
    """The first index ``>= start`` where ``pattern`` occurs in ``ids``, or -1."""
    n = len(pattern)
    for i in range(start, len(ids) - n + 1):
        if ids[i:i + n] == pattern:
            return i
    return -1


class DataCollatorForCompletionOnlyLM(DataCollatorForLanguageModeling):
    """Loss only on the completions: the tokens after ``response_template`` (and, with an
    ``instruction_template``, only on the responses of a conversation, never the instructions).

    The templates are strings (encoded without special tokens) or token ids. A row in which the
    response template is not found carries no loss (a warning; ``SFTTrainer`` drops and counts it).
    """

    def __init__(self, response_template, instruction_template=None, *args, mlm: bool = False,
                 ignore_index: int = IGNORE_INDEX, **kwargs):
        super().__init__(*args, mlm=mlm, **kwargs)
        self.response_template = response_template
        self.instruction_template = instruction_template
        self.response_token_ids = self._ids(response_template)
        self.instruction_token_ids = self._ids(instruction_template) if instruction_template is not None else None
        self.ignore_index = ignore_index
        if not self.mlm and self.instruction_template and self.tokenizer.pad_token_id == self.tokenizer.eos_token_id:
            import warnings

            warnings.warn("the pad token is the end-of-sequence token: with padding, the model may not learn to stop",
                          stacklevel=2)

    def _ids(self, template) -> list[int]:
        if isinstance(template, str):
            return self.tokenizer.encode(template, add_special_tokens=False)
        return list(template)

    def mask_labels(self, ids: list[int]) -> list[int]:
        """HF-convention labels of one row (``ignore_index`` where no loss)."""
        ids = list(ids)
        labels = [self.ignore_index] * len(ids)
        response = self.response_token_ids
        if self.instruction_token_ids is None:
            at = _find(ids, response)
            if at >= 0:
                labels[at + len(response):] = ids[at + len(response):]
            return labels
        at = _find(ids, response)
        while at >= 0:  # each response runs until the next instruction
            begin = at + len(response)
            end = _find(ids, self.instruction_token_ids, begin)
            end = len(ids) if end < 0 else end
            labels[begin:end] = ids[begin:end]
            at = _find(ids, response, end)
        return labels

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        for i, row in enumerate(batch["input_ids"].tolist()):
            labels = torch.tensor(self.mask_labels(row))
            if "attention_mask" in batch:
                labels[batch["attention_mask"][i] == 0] = self.ignore_index
            batch["labels"][i] = labels
        return batch


class RunningMoments(_RunningMoments):
    """TRL's ``RunningMoments(accelerator)``: running mean and std of scores (the accelerator is
    not needed: with several processes the PPO trainer gathers the scores first)."""

    def __init__(self, accelerator=None):
        super().__init__()
        self.accelerator = accelerator


class RewardDataCollatorWithPadding:
    """Accepted as ``RewardTrainer``'s ``data_collator`` (the default): pairs are packed by fastalign."""

    def __init__(self, tokenizer, padding=True, max_length=None, pad_to_multiple_of=None, return_tensors="pt"):
        self.tokenizer, self.max_length = tokenizer, max_length


class DPODataCollatorWithPadding:
    """Accepted as ``DPOTrainer``'s ``data_collator`` (the default): pairs are packed by fastalign."""

    def __init__(self, pad_token_id: int = 0, label_pad_token_id: int = IGNORE_INDEX, is_encoder_decoder=False):
        self.pad_token_id, self.label_pad_token_id = pad_token_id, label_pad_token_id


def compute_accuracy(eval_pred) -> dict[str, float]:
    """The fraction of pairs whose chosen reward (column 0) beats the rejected one (column 1)."""
    predictions = np.asarray(eval_pred.predictions)
    return {"accuracy": float((predictions[:, 0] > predictions[:, 1]).mean())}


def exact_div(a: int, b: int, a_str: str = "a", b_str: str = "b", custom_error_message: str = "") -> int:
    q = a // b
    if a != q * b:
        raise ValueError(f"{custom_error_message}, {a_str}={a}, {b_str}={b}, inexact division: {a} / {b} = {a / b}")
    return q


def pad_to_length(tensor: torch.Tensor, length: int, pad_value, dim: int = -1) -> torch.Tensor:
    if tensor.size(dim) >= length:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = length - tensor.size(dim)
    return torch.cat([tensor, pad_value * torch.ones(*shape, dtype=tensor.dtype, device=tensor.device)], dim=dim)


__all__ = ["AdaptiveKLController", "DPODataCollatorWithPadding", "DataCollatorForCompletionOnlyLM", "FixedKLController",
           "PerPromptStatTracker", "RewardDataCollatorWithPadding", "RunningMoments", "compute_accuracy",
           "disable_dropout_in_model", "exact_div", "pad_to_length"]
