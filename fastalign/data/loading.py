"""Reading datasets: a hub name, a local folder or file (JSON, JSONL, Parquet, CSV, gzipped too),
an in-memory ``datasets.Dataset``, or a plain list of row dicts. Everything goes through the
``datasets`` library, so its caching and formats apply unchanged.
"""

from __future__ import annotations

from pathlib import Path

import datasets

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _builder(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def load_rows(source, split: str = "train", name: str | None = None, streaming: bool = False):
    """A ``datasets.Dataset`` (or the list given) of rows from ``source``; with ``streaming`` a
    ``datasets.IterableDataset`` read as it goes (a data set larger than memory).

    ``source``: a ``Dataset`` or ``IterableDataset``; a ``DatasetDict`` (``split`` picks one); a
    list of dicts; a path to a data file or to a folder written by ``save_to_disk`` or holding data
    files; else a hub name (``name`` is its configuration).
    """
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise KeyError(f"split {split!r} not in the dataset (it has {sorted(source)})")
        return source[split]
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset, list)):
        return source.to_iterable_dataset() if streaming and isinstance(source, datasets.Dataset) else source
    if not isinstance(source, (str, Path)):
        raise TypeError(f"cannot read a dataset from a {type(source).__name__}")
    path = Path(source)
    if path.is_file():
        builder = _builder(path)
        if builder is None:
            raise ValueError(f"{path}: unknown data file type; use .json, .jsonl, .parquet or .csv (optionally .gz)")
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return load_rows(datasets.load_from_disk(str(path)), split, streaming=streaming)
        return datasets.load_dataset(str(path), name, split=split, streaming=streaming)
    if str(source).startswith((".", "/")) or str(source).count("/") > 1:
        raise FileNotFoundError(f"{source}: no such file or folder")
    return datasets.load_dataset(str(source), name, split=split, streaming=streaming)
