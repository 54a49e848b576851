"""The prompts of each generation: drawn the same on every process, each process generating for its
own slice of the repeated list (TRL's ``RepeatSampler`` order).

Generation ``g`` takes the ``g``-th block of ``per_generation`` prompts of an epoch's order (a
permutation of the data set drawn from ``seed + epoch`` when shuffling; the last partial block
dropped). Each prompt is repeated ``num_generations`` times, in place, and process ``r`` of ``P``
takes the ``r``-th of ``P`` equal slices of that list: a group may span two processes, as in TRL.
The position is the generation count alone, so a resumed run draws what the killed one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch

from fastalign.errors import ConfigError


@dataclass(frozen=True)
class PromptDraw:
    """One process's share of a generation: ``rows`` (dataset indices, one per completion, the
    group's completions contiguous) and ``first`` (its offset in the list of every process)."""

    rows: list[int]
    first: int


class PromptSampler:
    def __init__(self, size: int, per_generation: int, num_generations: int, seed: int, shuffle: bool,
                 rank: int = 0, world_size: int = 1):
        if size < per_generation:
            raise ConfigError(f"the data set has {size} prompts, fewer than one generation's "
                              f"{per_generation} (generation_batch_size / num_generations)")
        self.size, self.per_generation, self.num_generations = size, per_generation, num_generations
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.per_epoch = size // per_generation

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def draw(self, generation: int) -> PromptDraw:
        epoch, k = divmod(generation, self.per_epoch)
        block = self.order(epoch)[k * self.per_generation:(k + 1) * self.per_generation]
        repeated = [i for i in block for _ in range(self.num_generations)]
        share = len(repeated) // self.world_size
        first = self.rank * share
        return PromptDraw(repeated[first:first + share], first)


def cut_prompt(ids: torch.Tensor, max_prompt_length: int | None) -> tuple[torch.Tensor, bool]:
    """``ids`` keeping its last ``max_prompt_length`` tokens (the end, next to the completion), and
    whether it was cut."""
    if max_prompt_length is None or len(ids) <= max_prompt_length:
        return ids, False
    return ids[-max_prompt_length:], True


def check_room(dataset, config, max_positions: int | None = None) -> int:
    """Every prompt (cut to ``max_prompt_length``) leaves room for ``max_completion_length`` new
    tokens within one packed row and the model's positions, or a ``ConfigError`` names the longest;
    returns how many prompts ``max_prompt_length`` cuts."""
    column = dataset["input_ids"] if isinstance(dataset, datasets.Dataset) else [row["input_ids"] for row in dataset]
    lengths = [len(ids) for ids in column]
    keep = config.max_prompt_length or max(lengths)
    limit, what = config.max_tokens_per_batch, f"max_tokens_per_batch={config.max_tokens_per_batch}"
    if max_positions is not None and max_positions < limit:
        limit, what = max_positions, f"the model's {max_positions} positions"
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if min(lengths[longest], keep) + config.max_completion_length > limit:
        raise ConfigError(f"prompt row {longest} has {min(lengths[longest], keep)} tokens: with max_completion_length="
                          f"{config.max_completion_length} it does not fit {what}; set max_prompt_length, shorten the "
                          "prompts or lower max_completion_length")
    return sum(n > keep for n in lengths)


def _conversational(row) -> bool:
    prompt = row.get("prompt") if isinstance(row, dict) else None
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def _rendered(row: dict, tokenizer) -> dict:
    text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    return {"query": text, "input_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}


def render_conversations(rows, tokenizer):
    """Rows whose ``prompt`` is a list of chat messages get it rendered with the tokenizer's chat
    template, the assistant's turn opened (``query``, and its ``input_ids`` with no special tokens
    added: the template holds them); other rows are returned as they are."""
    if isinstance(rows, datasets.Dataset):
        if len(rows) == 0 or not _conversational(rows[0]):
            return rows
        return rows.map(lambda row: _rendered(row, tokenizer), desc="rendering the chat prompts")
    rows = list(rows)
    if not rows or not _conversational(rows[0]):
        return rows
    return [{**row, **_rendered(row, tokenizer)} for row in rows]
