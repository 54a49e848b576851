"""Padding-free packing: whole sequences laid end to end in one row, no pad token computed.

Sequences come in *units* that must share a batch: a single sequence for SFT, a (chosen,
rejected) pair for preference training. Units are placed by best-fit decreasing into batches of
at most ``max_tokens`` tokens (longest first, each into the fullest batch it still fits), then
each batch becomes one ``PackedBatch``:

    input_ids    [1, N]   every sequence's tokens, end to end
    position_ids [1, N]   restarting at 0 for each sequence (what isolates sequences in attention)
    cu_seqlens   [S+1]    int32 sequence boundaries; max_seqlen the longest sequence
    seq_index    [N]      which sequence each token belongs to
    labels       [N]      the next token where it is a loss token of the same sequence, else -100:
                          so never across a boundary, and never at a sequence's last token
    chosen, rejected [P]  for pairs: the sequence indices of each pair's two halves
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class Sequence:
    """One tokenized sequence; ``loss_mask[t]`` says whether token t is predicted with a loss.
    Lists or numpy arrays (a token store hands out views of its memory-mapped ids)."""

    input_ids: list[int] | np.ndarray
    loss_mask: list[bool] | np.ndarray | None = None  # None: every token after the first carries a loss

    def __post_init__(self):
        if len(self.input_ids) == 0:
            raise ValueError("a sequence needs at least one token")
        if self.loss_mask is not None and len(self.loss_mask) != len(self.input_ids):
            raise ValueError(f"loss_mask has {len(self.loss_mask)} entries for {len(self.input_ids)} tokens")


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_index: torch.Tensor
    labels: torch.Tensor
    chosen: torch.Tensor | None = None
    rejected: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)  # per-sequence tensors (margins, scores, ...)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_real_tokens(self) -> int:
        """Tokens of the sequences: all of them (no padding)."""
        return int(self.cu_seqlens[-1])

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> PackedBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedBatch(
            move(self.input_ids), move(self.position_ids), move(self.cu_seqlens), self.max_seqlen,
            move(self.seq_index), move(self.labels), move(self.chosen), move(self.rejected),
            {k: move(v) for k, v in self.extras.items()},
        )


def _fitting(unit_lengths, max_tokens: int) -> np.ndarray:
    """The units' lengths as an array; a unit longer than ``max_tokens`` is an error."""
    lengths = np.asarray(unit_lengths, dtype=np.int64).reshape(-1)
    too_long = np.flatnonzero(lengths > max_tokens)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"unit {i} has {lengths[i]} tokens, more than max_tokens_per_batch={max_tokens}")
    return lengths


def plan_units(unit_lengths, max_tokens: int) -> list[np.ndarray]:
    """Best-fit decreasing: arrays of unit indices, each array's lengths summing to <= max_tokens.

    Deterministic: ties keep the input order; each batch lists its units in the order they were
    placed (longest first). A unit longer than ``max_tokens`` is an error. What is kept is one
    index per unit, not a Python object (a data set of millions of rows plans in little memory).
    """
    lengths = _fitting(unit_lengths, max_tokens)
    order = np.argsort(-lengths, kind="stable")
    batch_of = np.empty(len(order), dtype=np.int64)  # in placing order
    free: list[tuple[int, int]] = []  # (room left, batch index), sorted
    batches = 0
    for k, need in enumerate(lengths[order].tolist()):
        slot = bisect.bisect_left(free, (need, -1))
        if slot < len(free):
            room, b = free.pop(slot)
        else:
            room, b, batches = max_tokens, batches, batches + 1
        batch_of[k] = b
        bisect.insort(free, (room - need, b))
    grouped = order[np.argsort(batch_of, kind="stable")]
    return np.split(grouped, np.cumsum(np.bincount(batch_of, minlength=batches))[:-1]) if batches else []


def plan_padded(unit_lengths, max_tokens: int) -> list[np.ndarray]:
    """Batches for a padded layout (one row per unit, as long as its longest): units longest
    first, each batch as many consecutive ones as ``rows x its longest <= max_tokens`` allows.
    Same return as ``plan_units``; deterministic (ties keep the input order)."""
    lengths = _fitting(unit_lengths, max_tokens)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        rows = max(1, max_tokens // max(1, int(lengths[order[start]])))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def plan_batches(unit_lengths, max_tokens: int) -> list[list[int]]:
    """``plan_units`` as lists of ints."""
    return [units.tolist() for units in plan_units(unit_lengths, max_tokens)]


def pack(units: list[list[Sequence]], extras: dict[str, list[float]] | None = None) -> PackedBatch:
    """One ``PackedBatch`` from units (lists of sequences). Units of two sequences are pairs
    (chosen first); ``extras`` maps a name to one value per *sequence* (in unit order)."""
    seqs = [s for unit in units for s in unit]
    if units and all(len(u) == 2 for u in units):
        pairs = True
    elif any(len(u) != 1 for u in units):
        raise ValueError("units must all be single sequences or all be (chosen, rejected) pairs")
    else:
        pairs = False
    lengths = np.array([len(s.input_ids) for s in seqs], dtype=np.int64)
    ids = np.concatenate([np.asarray(s.input_ids, dtype=np.int64) for s in seqs])
    mask = np.concatenate([np.ones(len(s.input_ids), dtype=bool) if s.loss_mask is None
                           else np.asarray(s.loss_mask, dtype=bool) for s in seqs])
    starts = np.cumsum(lengths) - lengths
    seq_index = np.repeat(np.arange(len(seqs)), lengths)
    # The next token where it carries a loss and belongs to the same sequence, else -100.
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    scored = mask[1:] & (seq_index[1:] == seq_index[:-1])
    labels[:-1][scored] = ids[1:][scored]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.from_numpy(np.cumsum(lengths))
    batch = PackedBatch(
        input_ids=torch.from_numpy(ids).unsqueeze(0),
        position_ids=torch.from_numpy(np.arange(len(ids)) - np.repeat(starts, lengths)).unsqueeze(0),
        cu_seqlens=cu,
        max_seqlen=int(lengths.max()),
        seq_index=torch.from_numpy(seq_index),
        labels=torch.from_numpy(labels),
        extras={k: torch.tensor(v, dtype=torch.float32) for k, v in (extras or {}).items()},
    )
    if pairs:
        starts = torch.arange(0, len(seqs), 2)
        batch.chosen, batch.rejected = starts, starts + 1
    return batch


def pack_all(units: list[list[Sequence]], max_tokens: int,
             extras: dict[str, list[list[float]]] | None = None) -> list[PackedBatch]:
    """Plan and pack every unit: the batches of an epoch, in plan order. ``extras`` maps a name
    to one list per unit of one value per sequence (a pair's ``[chosen, rejected]`` margins)."""
    plan = plan_batches([sum(len(s.input_ids) for s in u) for u in units], max_tokens)
    extras = extras or {}
    return [pack([units[i] for i in batch], {k: [x for i in batch for x in v[i]] for k, v in extras.items()})
            for batch in plan]
