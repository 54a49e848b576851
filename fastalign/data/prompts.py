"""Prompt rows to query texts and token ids, for online algorithms (PPO) that generate from them.

A row holds a ``query`` (or ``prompt``) text, its ``input_ids``, or both; an HH-RLHF preference row
(a ``chosen`` dialogue) gives its dialogue up to and including the last assistant marker. A row's
other columns stay with it (they reach a custom ``data_collator``). A ``datasets.Dataset`` is
tokenized once through ``datasets.map`` (worker processes, cached beside the data set, the main
process of each machine first) and read with ``input_ids`` as tensors; a list of rows in memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import datasets
import torch

from fastalign.errors import DataError

from .rows import Texts, check_token_ids, in_file, source_file

ASSISTANT = "\n\nAssistant:"


def dialogue_prompt(dialogue: str, i: int) -> str:
    """An HH-RLHF-style dialogue up to and including its last ``Assistant:`` marker."""
    cut = dialogue.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"dataset row {i}, column 'chosen': no {ASSISTANT!r} turn to take the prompt from")
    return dialogue[:cut + len(ASSISTANT)]


@dataclass
class PromptEncoder:
    """Prompt rows to their ``query`` text and ``input_ids`` (the other columns are left as they are)."""

    tokenizer: object

    def _query(self, row, i) -> str | None:
        if not isinstance(row, dict):
            raise DataError(f"dataset row {i}: expected a mapping with 'query', 'prompt' or 'input_ids', "
                             f"got {type(row).__name__}")
        text = row.get("query", row.get("prompt"))
        if text is None and row.get("input_ids") is None and isinstance(row.get("chosen"), str):
            text = dialogue_prompt(row["chosen"], i)  # a preference row: its prompt
        if text is not None and not isinstance(text, str):
            raise DataError(f"dataset row {i}, column 'query'/'prompt': expected text, got {type(text).__name__}")
        if row.get("input_ids") is None and not text:
            raise DataError(f"dataset row {i}: no 'query' or 'prompt' text and no 'input_ids'")
        return text

    def __call__(self, rows: list[dict], indices: list[int]) -> dict[str, list]:
        queries = [self._query(row, i) for row, i in zip(rows, indices)]
        texts = Texts()
        slots = [texts.add(q, True) if row.get("input_ids") is None else None for row, q in zip(rows, queries)]
        texts.encode(self.tokenizer)
        out, vocab = {"query": [], "input_ids": []}, len(self.tokenizer)
        for row, i, query, slot in zip(rows, indices, queries, slots):
            ids = texts[slot] if slot is not None else torch.as_tensor(row["input_ids"]).flatten().tolist()
            if len(ids) == 0:
                raise DataError(f"dataset row {i}, column 'input_ids': the query has no tokens")
            check_token_ids(ids, i, "input_ids", vocab)
            out["query"].append(query if query is not None else self.tokenizer.decode(ids, skip_special_tokens=True))
            out["input_ids"].append(ids)
        return out


def tokenize_prompts(rows, tokenizer, num_proc: int | None = None, main_first=contextlib.nullcontext):
    """The rows with ``query`` and ``input_ids`` (a tensor) added: a ``datasets.Dataset`` (mapped,
    cached; ``main_first`` as in ``store.tokenize_rows``) or, for any other iterable of rows, a
    list of dicts."""
    from .store import RowBatches, default_num_proc

    encode = PromptEncoder(tokenizer)
    if isinstance(rows, datasets.Dataset):
        num_proc = default_num_proc(len(rows)) if num_proc is None else num_proc
        file = source_file(rows)
        with main_first(), in_file(file):
            rows = rows.map(RowBatches(encode), batched=True, with_indices=True, desc="tokenizing the prompts",
                            num_proc=num_proc if num_proc > 1 and len(rows) >= 2 * num_proc else None)
        prepared = rows.with_format("torch", columns=["input_ids"], output_all_columns=True)
        prepared.fastalign_file = file  # the rows' data file stays named in later checks (rows.source_file)
        return prepared
    rows = list(rows)
    columns = encode(rows, list(range(len(rows))))
    return [dict(row, query=q, input_ids=torch.tensor(ids, dtype=torch.long))
            for row, q, ids in zip(rows, columns["query"], columns["input_ids"])]
