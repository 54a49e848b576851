"""Unpaired preference rows (KTO): each completion is desirable or undesirable on its own.

A row is ``{"prompt", "completion", "label"}``: text, and ``label`` true (desirable) or false
(undesirable); 1 and 0 count too. The prompt and completion are tokenized as SFT's prompt/completion
rows (``SFTEncoder``: the completion ends with the EOS token, the loss is on the completion,
``max_length`` tokens kept by ``truncation_mode``, a row left without completion tokens dropped and
counted), the label kept beside them in the token store. A bad or missing label is a ``DataError``
naming the row and the column. ``unpair`` turns preference pairs into such rows (the chosen
completion desirable, the rejected one undesirable), as TRL's ``unpair_preference_dataset``.

``mismatched(batch)`` builds KTO's KL batch from a packed batch of such rows: sequence ``i``'s prompt
followed by sequence ``i - 1``'s completion (the first takes the last's), the loss on that
completion. TRL 1.16 rotates the completions of a batch by one in the same way, so that the
mismatched completions of a batch are the batch's own completions, each after another prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

from .formats import SFTEncoder
from .packing import IGNORE_INDEX, PackedBatch, Sequence, pack
from .rows import check_truncation, row_error, row_text, row_value


def row_label(row: dict, i: int, column: str = "label") -> bool:
    """Row ``i``'s desirability: true or false (1 or 0 count too)."""
    value = row_value(row, i, column)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    got = "null" if value is None else repr(value)
    raise row_error(i, column, f"expected true (desirable) or false (undesirable), got {got}")


@dataclass
class UnpairedEncoder:
    """Unpaired rows to token-store columns: SFT's prompt/completion columns plus ``label``."""

    tokenizer: object
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    extra_features = {"label": datasets.Value("bool")}

    def __post_init__(self):
        check_truncation(self.max_length, self.truncation_mode)

    def __call__(self, rows: list[dict], indices: list[int]) -> dict[str, list]:
        labels = []
        for row, i in zip(rows, indices):
            for column in ("prompt", "completion"):  # text, checked before the label
                row_text(row, i, column)
            labels.append(row_label(row, i))
        encode = SFTEncoder(self.tokenizer, max_length=self.max_length, truncation_mode=self.truncation_mode)
        prompt_rows = [{"prompt": row["prompt"], "completion": row["completion"]} for row in rows]
        return {**encode(prompt_rows, indices), "label": labels}


def unpair(pairs) -> list[dict]:
    """Preference rows ``{"prompt", "chosen", "rejected"}`` as unpaired rows, two per pair: the
    chosen completion with ``label`` true, then the rejected one with ``label`` false."""
    return [{"prompt": p["prompt"], "completion": p[half], "label": half == "chosen"}
            for p in pairs for half in ("chosen", "rejected")]


def mismatched(batch: PackedBatch) -> PackedBatch:
    """KTO's KL batch of ``batch`` (see the module docstring), on ``batch``'s device. Each sequence
    is split where its loss starts: the prompt, then the completion."""
    cu = batch.cu_seqlens.tolist()
    ids = batch.input_ids[0].cpu().numpy()
    scored = (batch.labels != IGNORE_INDEX).cpu().numpy()
    prompts, completions = [], []
    for start, end in zip(cu[:-1], cu[1:]):
        split = start + int(np.argmax(scored[start:end])) + 1  # the first completion token
        prompts.append(ids[start:split])
        completions.append(ids[split:end])
    units = []
    for i, prompt in enumerate(prompts):
        completion = completions[i - 1]
        mask = np.arange(len(prompt) + len(completion)) >= len(prompt)
        units.append([Sequence(np.concatenate((prompt, completion)), mask)])
    return pack(units).to(batch.input_ids.device)
