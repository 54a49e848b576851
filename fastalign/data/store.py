"""Token stores: a data set tokenized once, in parallel and cached, then read without copies.

    rows ─▶ datasets.Dataset.map(batched, num_proc, fingerprinted cache) ─▶ Arrow table ─▶ TokenStore

Every row of the data set becomes one row of an Arrow table (``datasets``' cache file beside the
data set's own, memory-mapped), in the same order, so a row keeps its index: errors and reports
name the row of the data set. Each half of a row (one for SFT, ``chosen_`` and ``rejected_`` for
pairs) has

    {half}ids     list<int32>  the sequence's tokens, empty where the row is dropped
    {half}prompt  int32        leading tokens that carry no loss (a prompt)
    {half}mask    list<uint8>  the loss mask (0/1) where a prefix does not say it (chat turns, labels), else empty

and each row ``truncated`` (bool), ``loss`` (int32, its loss tokens: an SFT micro-batch's weight)
and, for pairs, ``margin`` (float64, null where the row has none). An encoder adds its own columns
with an ``extra_features`` mapping: unpaired rows (KTO) a ``label`` (bool), which makes a row
weigh 1 and goes with its sequence into the packed batch (``extras["label"]``).

A second run with the same rows, tokenizer and settings finds the cache (``datasets`` fingerprints
the data set and the tokenizing function) and skips the tokenizer. Under several processes the
main process of each machine tokenizes first and the others then read its cache. A data set held
in memory (a list of rows, or a ``Dataset`` made in memory) is tokenized in memory: no cache.

``TokenStore`` reads the list columns as numpy views of the Arrow buffers. What it keeps in RAM
is per row (lengths, loss-token counts, margins: a few bytes each); the token ids stay in the
file until a packed batch reads their pages.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa

from fastalign.errors import DataError

from .formats import TokenizeReport
from .loading import file_error
from .packing import Sequence, pack
from .rows import in_file, source_file

SFT_HALVES = ("",)
PAIR_HALVES = ("chosen_", "rejected_")
# A data set of fewer rows is tokenized in the calling process (starting workers costs seconds).
PARALLEL_MIN_ROWS = 20_000


def features(halves: tuple[str, ...], extra: dict | None = None) -> datasets.Features:
    """The store's columns (see the module docstring), and an encoder's ``extra`` ones."""
    columns = {}
    for half in halves:
        columns.update({f"{half}ids": datasets.List(datasets.Value("int32")), f"{half}prompt": datasets.Value("int32"),
                        f"{half}mask": datasets.List(datasets.Value("uint8"))})
    columns.update(truncated=datasets.Value("bool"), loss=datasets.Value("int32"))
    if len(halves) == 2:
        columns["margin"] = datasets.Value("float64")
    return datasets.Features({**columns, **(extra or {})})


def encoded_features(encode, halves: tuple[str, ...]) -> datasets.Features:
    """The columns of what ``encode`` writes: the store's, and its ``extra_features`` if it has any."""
    return features(halves, getattr(encode, "extra_features", None))


def default_num_proc(rows: int) -> int:
    """Tokenizing processes for ``rows`` rows: every core (at most 8) for a large data set, else 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if rows < PARALLEL_MIN_ROWS else max(1, min(8, cores))


def tokenize_rows(rows, encode, halves: tuple[str, ...], *, num_proc: int | None = None, desc: str = "tokenizing",
                  progress: bool = True, main_first=contextlib.nullcontext):
    """The token table of ``rows`` (a ``datasets.Dataset`` or a list of row dicts).

    ``encode(rows: list[dict], indices: list[int]) -> dict of columns`` tokenizes a batch of rows;
    it must be picklable (it runs in worker processes) and deterministic (its hash keys the cache).
    ``progress``: ``datasets``' progress bar while it tokenizes. ``main_first``: a context under
    which the tokenizing runs, the machine's main process first (the trainers pass
    ``engine.distributed.local_main_first``; the data layer knows no processes of its own).
    """
    if not isinstance(rows, datasets.Dataset):  # a list of rows: one call, in memory
        return encode_table([dict(r) if isinstance(r, dict) else r for r in rows], encode, halves)
    num_proc = default_num_proc(len(rows)) if num_proc is None else num_proc
    with main_first(), _progress_bars(progress), in_file(source_file(rows)):
        table = rows.map(
            RowBatches(encode), batched=True, with_indices=True, remove_columns=rows.column_names,
            features=encoded_features(encode, halves), num_proc=num_proc if num_proc > 1 and len(rows) >= 2 * num_proc else None,
            desc=desc,
        )
    return table.data.table


def encode_table(rows: list, encode, halves: tuple[str, ...], first: int = 0) -> pa.Table:
    """The token table of rows held in memory, the first being row ``first`` of the data set."""
    return pa.table(encode(rows, list(range(first, first + len(rows)))), schema=encoded_features(encode, halves).arrow_schema)


def store_of(table: pa.Table, halves: tuple[str, ...]) -> TokenStore:
    """The ``TokenStore`` of a token table: of pairs, or of SFT rows."""
    return pair_store(table) if halves == PAIR_HALVES else sft_store(table)


def sft_store(table: pa.Table) -> TokenStore:
    """A ``TokenStore`` of SFT rows."""
    return TokenStore(table, SFT_HALVES)


def pair_store(table: pa.Table) -> TokenStore:
    """A ``TokenStore`` of preference pairs, reported as such."""
    return TokenStore(table, PAIR_HALVES, unit="pairs", dropped_because="bad pairs")


@dataclass
class Stream:
    """A streamed data set and how to tokenize it: read window by window (``StreamBatches``)."""

    rows: datasets.IterableDataset
    encode: object
    halves: tuple[str, ...]


def token_data(rows, encode, halves, **options):
    """``rows`` tokenized by ``encode`` (``options`` as ``tokenize_rows``'): a ``TokenStore``, or for
    a streamed data set a ``Stream`` (tokenized as it is read)."""
    if isinstance(rows, datasets.IterableDataset):
        return Stream(rows, encode, halves)
    store = store_of(tokenize_rows(rows, encode, halves, **options), halves)
    store.source = source_file(rows)
    return store


@contextlib.contextmanager
def _progress_bars(show: bool):
    """``datasets``' progress bars on or off for the block, as they were after it."""
    was_off = datasets.are_progress_bars_disabled()
    if not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_off:
            datasets.enable_progress_bars()


class RowBatches:
    """``datasets.map``'s batch (a dict of columns) as the list of row dicts ``encode`` takes."""

    def __init__(self, encode):
        self.encode = encode

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        return self.encode(_rows_of(batch), indices)


def _rows_of(batch: dict) -> list[dict]:
    """A batch of columns as the list of its rows."""
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


class _ListColumn:
    """A ``list<...>`` column of an Arrow table as per-chunk numpy views (no copy where the
    values are plain numbers: the views read the memory-mapped file)."""

    def __init__(self, column: pa.ChunkedArray):
        self.values, self.offsets, starts = [], [], [0]
        for chunk in column.chunks:
            self.offsets.append(chunk.offsets.to_numpy())
            self.values.append(chunk.values.to_numpy())
            starts.append(starts[-1] + len(chunk))
        self.starts = np.array(starts, dtype=np.int64)

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(o) for o in self.offsets]) if self.offsets else np.zeros(0, np.int64)

    def __getitem__(self, row: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, row, side="right")) - 1
        k = row - self.starts[c]
        offsets = self.offsets[c]
        return self.values[c][offsets[k]:offsets[k + 1]]


@dataclass
class Half:
    """One half's columns of a token store."""

    ids: _ListColumn
    prompt: np.ndarray
    mask: _ListColumn


class TokenStore:
    """A token table read as units for packing: unit ``i`` is row ``i``'s sequences (one, or a pair).

    ``lengths[i]``: the unit's tokens (0 for a dropped row); ``weights[i]``: what it counts in a
    step's mean (loss tokens for SFT, 1 for a pair); ``kept``: the rows that are not dropped;
    ``margins``: per row, where the data set has them (a missing one counts as 0).
    """

    def __init__(self, table: pa.Table, halves: tuple[str, ...], unit: str = "rows",
                 dropped_because: str = "no loss token left"):
        self.table = table
        self.halves = [Half(_ListColumn(table.column(f"{h}ids")), table.column(f"{h}prompt").to_numpy(),
                            _ListColumn(table.column(f"{h}mask"))) for h in halves]
        self.lengths = sum(h.ids.lengths() for h in self.halves) if len(table) else np.zeros(0, np.int64)
        self.kept = np.flatnonzero(self.lengths > 0)
        self.weights = (np.ones(len(table), np.float64) if len(halves) == 2
                        else table.column("loss").to_numpy().astype(np.float64))
        self.margins = None
        if "margin" in table.column_names and table.column("margin").null_count < len(table):
            self.margins = table.column("margin").fill_null(0.0).to_numpy()
        self.sequence_extras: dict[str, np.ndarray] = {}  # name -> [rows, halves] values, added by trainers
        if "label" in table.column_names:  # unpaired rows: each weighs 1, its label goes with its sequence
            self.weights = np.ones(len(table), np.float64)
            labels = table.column("label").to_numpy(zero_copy_only=False)
            self.sequence_extras["label"] = labels[:, None].astype(np.float32)
        truncated = int(np.count_nonzero(table.column("truncated").to_numpy(zero_copy_only=False)))
        self.report = TokenizeReport(len(table), truncated, len(table) - len(self.kept), unit, dropped_because)
        # Where the rows come from, for errors: the data file (when there is one) and the data set
        # row of store row 0 (a stream window's first row).
        self.source: str | None = None
        self.first_row = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def longest_sequence(self) -> tuple[int, int]:
        """``(row, tokens)``: the data set row holding the longest single sequence (a half of a pair)."""
        if not len(self.lengths):
            return self.first_row, 0
        longest = np.max([h.ids.lengths() for h in self.halves], axis=0)
        row = int(np.argmax(longest))
        return self.first_row + row, int(longest[row])

    def unit(self, i: int) -> list[Sequence]:
        """Row ``i``'s sequences, the loss mask from the prompt length or the stored mask."""
        out = []
        for half in self.halves:
            ids, mask = half.ids[i], half.mask[i]
            mask = np.arange(len(ids)) >= half.prompt[i] if len(mask) == 0 else mask.astype(bool)
            out.append(Sequence(ids, mask))
        return out

    def extras(self, units: list[int]) -> dict[str, list[float]]:
        """Per-sequence extras of a batch of units: the pairs' margins (on both halves) and what
        ``sequence_extras`` holds."""
        out = {name: values[units].reshape(-1).tolist() for name, values in self.sequence_extras.items()}
        if self.margins is not None:
            out["margin"] = np.repeat(self.margins[units], len(self.halves)).tolist()
        return out


class Batches:
    """An epoch's packed micro-batches over a token store: planned from the units' lengths alone,
    each ``PackedBatch`` built when it is read (``batches[k]``), so only the micro-batches of the
    step at hand exist. ``plan[k]`` lists the units (store rows) of micro-batch ``k``. ``collate``
    builds a batch from units and extras (``pack``; an encoder-decoder model's trainer gives its
    padded one)."""

    def __init__(self, store: TokenStore, plan: list, collate=pack):
        self.store, self.plan, self.collate = store, plan, collate

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int):
        if not -len(self.plan) <= k < len(self.plan):
            raise IndexError(k)
        units = self.plan[k]
        return self.collate([self.store.unit(i) for i in units], self.store.extras(units))

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def weight(self, k: int) -> float:
        """What micro-batch ``k`` counts in a step's mean (its loss tokens, or its pairs)."""
        return float(self.store.weights[self.plan[k]].sum())


class StreamBatches:
    """Micro-batches of a streamed data set (``datasets.IterableDataset``), for data larger than
    memory: rows are read and tokenized ``window`` at a time, each window planned and packed like
    an epoch of its own (its micro-batches shuffled from the seed), so memory holds one window.

    ``take(n)`` hands out the next ``n`` micro-batches as running indices that ``self[k]`` builds
    and ``weight(k)`` weighs, the same on every process (each builds only its share). When the
    stream ends, the next epoch reads it again. ``state()`` is the position (epoch, first row of
    the current window, its micro-batches taken): what a checkpoint keeps. ``load_state`` goes back
    there by skipping rows, not tokenizing them.
    """

    def __init__(self, rows, encode, halves, plan, window: int, seed: int | None, collate=pack):
        self.rows, self.encode, self.halves, self.collate = rows, encode, halves, collate
        self.plan_of, self.window_rows, self.seed = plan, window, seed
        self.epoch, self.start, self.used = 0, 0, 0  # the position: see state()
        self.window: Batches | None = None
        self.window_len = 0  # rows in the current window
        self.order: list[int] = []
        self.live: dict[int, tuple[Batches, int]] = {}  # the micro-batches of the step at hand
        self.taken = 0
        self._reader = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "used": self.used}

    def load_state(self, state: dict) -> None:
        self.epoch, self.start, self._reader = state["epoch"], state["start"], None
        self._read_window()
        self.used = state["used"]

    def _read_window(self) -> None:
        """The window of rows from ``self.start`` on (the next one that keeps at least one unit)."""
        file = source_file(self.rows)
        while True:
            if self._reader is None:
                self._reader = iter(self.rows.skip(self.start).iter(batch_size=self.window_rows))
            batch = _next_batch(self._reader, file)
            if batch is None:  # the stream is over: the next epoch reads it again
                if self.start == 0:
                    raise DataError(f"{file or 'the streamed training set'}: no rows")
                self.epoch, self.start, self._reader = self.epoch + 1, 0, None
                continue
            rows = _rows_of(batch)
            with in_file(file):
                table = encode_table(rows, self.encode, self.halves, self.start)
            store = store_of(table, self.halves)
            store.source, store.first_row = file, self.start
            self.window_len = len(rows)
            if len(store.kept):
                self.window, self.used = Batches(store, self.plan_of(store), self.collate), 0
                self.order = list(range(len(self.window)))
                if self.seed is not None:
                    rng = np.random.default_rng([self.seed, self.epoch, self.start])
                    self.order = rng.permutation(len(self.window)).tolist()
                return
            self.start += len(rows)

    def take(self, n: int) -> list[int]:
        """The next ``n`` micro-batches (running indices); the previous step's are let go."""
        self.live = {}
        out = []
        for _ in range(n):
            if self.window is None:
                self._read_window()
            elif self.used == len(self.window):
                self.start += self.window_len
                self._read_window()
            self.live[self.taken] = (self.window, self.order[self.used])
            out.append(self.taken)
            self.taken += 1
            self.used += 1
        return out

    def __getitem__(self, k: int):
        window, i = self.live[k]
        return window[i]

    def weight(self, k: int) -> float:
        window, i = self.live[k]
        return window.weight(i)


def _next_batch(reader, file: str | None):
    """The next batch of a streamed data set, None at its end; a data file that cannot be read
    is a ``DataError`` naming the place in the file."""
    try:
        return next(reader, None)
    except Exception as error:
        if file is None:
            raise
        raise file_error(error, [file], file) from error
