"""PPO's prompts: a data loader of ``batch_size`` prompt rows at a time (each process its own share
of every epoch, shuffled from the seed), read epoch after epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import datasets
import torch

from fastalign.data.rows import source_file
from fastalign.engine import distributed
from fastalign.errors import ConfigError


def dict_of_lists(rows: list[dict]) -> dict[str, list]:
    """The default collator: a batch of rows as one list per column."""
    return {key: [row[key] for row in rows] for key in rows[0]}


def prompt_loader(dataset: datasets.Dataset, batch_size: int, seed: int,
                  collate_fn: Callable[[list[dict]], dict]) -> torch.utils.data.DataLoader:
    """Batches of ``batch_size`` rows of ``dataset`` (the last partial one dropped), shuffled from
    ``seed``; with several processes each gets its own share (a ``DistributedSampler``)."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = None
    if distributed.world_size() > 1:
        sampler = DistributedSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                     shuffle=True, seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed) if sampler is None else None)


def endless(dataloader: torch.utils.data.DataLoader, skip: int = 0) -> Iterator[dict]:
    """``dataloader``'s batches, epoch after epoch, after skipping ``skip`` (a resumed run)."""
    epoch = 0
    while True:
        if dataloader.sampler is not None and hasattr(dataloader.sampler, "set_epoch"):
            dataloader.sampler.set_epoch(epoch)
        for batch in dataloader:
            if skip:
                skip -= 1
                continue
            yield batch
        epoch += 1


def check_prompt_lengths(dataset, max_new_tokens: int, max_tokens_per_batch: int,
                         max_positions: int | None = None) -> None:
    """Every prompt leaves room for ``max_new_tokens`` within one packed row (``max_tokens_per_batch``)
    and the model's positions: the longest is named before any generation (a ``ConfigError``)."""
    column = dataset["input_ids"] if isinstance(dataset, datasets.Dataset) else [row["input_ids"] for row in dataset]
    lengths = [len(ids) for ids in column]
    if not lengths:
        return
    limit, what = max_tokens_per_batch, f"max_tokens_per_batch={max_tokens_per_batch}"
    if max_positions is not None and max_positions < limit:
        limit, what = max_positions, f"the model's {max_positions} positions"
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] + max_new_tokens > limit:
        file = source_file(dataset)
        raise ConfigError(f"{file + ': ' if file else ''}prompt row {longest} has {lengths[longest]} tokens: with "
                          f"max_new_tokens={max_new_tokens} it does not fit {what}; shorten or drop the long prompts, "
                          "or lower max_new_tokens")
