"""Reading datasets: a hub name, a local folder or file (JSON, JSONL, Parquet, CSV, gzipped too),
an in-memory ``datasets.Dataset``, or a plain list of row dicts. Everything goes through the
``datasets`` library, so its caching and formats apply unchanged, with these checks:

- a local path that does not exist is a ``FileNotFoundError`` at once, never a Hub lookup, and a
  Hub name fails in a moment when the Hub cannot be reached (``fastalign.data.hub``);
- a data file that cannot be read, or holds no rows, is a ``DataError`` naming the file and where
  it goes wrong (``rows.jsonl: line 4: not valid JSON``, ``line 2, byte 24: not valid UTF-8``,
  ``row 1050, column 'score': a string, unlike row 0 (a number)``), found by reading the file
  again only then (or when ``datasets`` read a column of mixed kinds, which it would change);
- a split the source does not have is a ``ConfigError`` naming the ones it has; a single data file
  holds one split, ``train``; a configuration name (``name``) is refused for a local path;
- a CSV cell is text, as written (``0278`` stays ``0278``, not the number 278; a margin is read
  as a number where it is used), and missing only when empty: ``NA``, ``null`` or ``nan`` stay
  the text they are;
- rows read from one file remember it (``rows.source_file``), so the row errors of tokenizing them
  name it too.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import itertools
import json
import lzma
import os
from pathlib import Path

import datasets

from fastalign.errors import ConfigError, DataError

from .hub import from_hub, looks_local, not_found

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_PACKED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": None}
_SUFFIXES = tuple(_BUILDERS) + tuple(_PACKED)
_OPTIONS = {"csv": {"keep_default_na": False, "na_values": [""]}}  # only an empty cell is missing


def _builder(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in _PACKED]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def load_rows(source, split: str = "train", name: str | None = None, streaming: bool = False):
    """A ``datasets.Dataset`` (or the list given) of rows from ``source``; with ``streaming`` a
    ``datasets.IterableDataset`` read as it goes (a data set larger than memory).

    ``source``: a ``Dataset`` or ``IterableDataset``; a ``DatasetDict`` (``split`` picks one); a
    list of dicts; a path to a data file or to a folder written by ``save_to_disk`` or holding data
    files (``train.jsonl``, ``test.jsonl``: a split each); else a hub name (``name`` is its
    configuration).
    """
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return _split_of(source, split, "the data set")
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset, list)):
        return source.to_iterable_dataset() if streaming and isinstance(source, datasets.Dataset) else source
    if not isinstance(source, (str, Path)):
        raise TypeError(f"cannot read a dataset from a {type(source).__name__}")
    shown, path = str(source), Path(source).expanduser()
    if name is not None and path.exists():
        raise ConfigError(f"dataset_config {name!r}: {shown} is a local {'file' if path.is_file() else 'folder'}, which "
                          "has no configurations (dataset_config names one of a Hub data set's)")
    if path.is_file():
        return _read_file(path, shown, split, streaming)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return load_rows(_split_of(datasets.load_from_disk(str(path)), split, shown), split, streaming=streaming)
        return _read_folder(path, shown, split, name, streaming)
    if looks_local(shown, _SUFFIXES):
        raise not_found(shown, "file or folder")
    return from_hub(lambda: datasets.load_dataset(shown, name, split=split, streaming=streaming), "data set", shown)


def _split_of(data, split: str, where: str):
    """Split ``split`` of a ``DatasetDict`` (anything else is returned as it is)."""
    if not isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return data
    if split not in data:
        raise ConfigError(f"{where}: no split {split!r} (it has {_listed(data)})")
    return data[split]


def _listed(names) -> str:
    return ", ".join(repr(str(n)) for n in sorted(map(str, names)))


def _read_file(path: Path, shown: str, split: str, streaming: bool):
    builder = _builder(path)
    if builder is None:
        raise DataError(f"{shown}: unknown data file type; use .json, .jsonl, .parquet or .csv (optionally .gz)")
    if split.split("[")[0] != "train":
        suffix = "".join(path.suffixes)
        raise ConfigError(
            f"{shown}: no split {split!r}: a single data file holds one split, 'train' (dataset_test_split "
            f"names a split, not a file: put train{suffix} and {split}{suffix} in one folder and give the folder)")
    options = {**_OPTIONS.get(builder, {}), **_as_text(path, builder)}
    return _checked(lambda: datasets.load_dataset(builder, data_files=str(path), split=split, streaming=streaming,
                                                  **options), [shown], shown, streaming)


def _as_text(path: Path, builder: str | None) -> dict:
    """For a CSV file, ``features`` reading every column of its header as text (pandas would read a
    column of digits as numbers: ``0278`` as 278); else nothing. A header that cannot be read is left
    to the reader (its error names the file)."""
    if builder != "csv":
        return {}
    try:
        header = next(csv.reader(text for _, text in _lines(path)), [])
    except (DataError, OSError, EOFError, csv.Error):
        return {}
    if not header or len(set(header)) != len(header):
        return {}
    return {"features": datasets.Features({column: datasets.Value("string") for column in header})}


def _read_folder(path: Path, shown: str, split: str, name: str | None, streaming: bool):
    """A split of a folder of data files, named by their file names (``datasets``' rule)."""
    builder = datasets.load_dataset_builder(str(path), name)
    splits = {str(k): [os.path.join(shown, os.path.relpath(f, path.resolve())) for f in files]
              for k, files in (builder.config.data_files or {}).items()}
    if split.split("[")[0] not in splits:
        raise ConfigError(f"{shown}: no split {split!r} (it has {_listed(splits)})")
    files = splits[split.split("[")[0]]
    options = {**_OPTIONS.get(builder.name, {}), **_as_text(Path(files[0]).expanduser(), _builder(Path(files[0])))}
    return _checked(lambda: datasets.load_dataset(str(path), name, split=split, streaming=streaming, **options),
                    sum(splits.values(), []), files[0] if len(files) == 1 else shown, streaming)


def _checked(load, files: list[str], source: str, streaming: bool):
    """``load()``'s rows, read from ``files`` (all of which it may read), checked (see the module
    docstring); ``source``, the file or folder they come from, is what errors name."""
    try:
        rows = load()
        if not streaming:
            rows.data.table.validate(full=True)  # invalid UTF-8 passes the JSON reader
    except Exception as error:
        raise file_error(error, files, source) from error
    if not streaming and len(rows) == 0:
        raise DataError(f"{source}: no rows")
    if not streaming and any(isinstance(f, datasets.Json) for f in rows.features.values()):
        # A column of mixed kinds: datasets keeps it as JSON and decodes the texts that read as JSON
        # (the completion "0278" would come back as the number 278). The first unlike value is named.
        for file in files:
            broken, unlike = _scan(Path(file).expanduser())
            if broken or unlike:
                raise DataError(f"{file}: {broken or unlike}")
    rows.fastalign_file = source  # read by rows.source_file
    return rows


def file_error(error: BaseException, files: list[str], source: str) -> DataError:
    """The ``DataError`` of data files ``datasets`` could not read, found by reading them again:
    the first place where one is not valid (UTF-8, JSON or CSV) or holds no rows, else the first
    value of another kind than its column's first one; else the library's own words about
    ``source`` (the file or folder)."""
    found = [(file, *_scan(Path(file).expanduser())) for file in files]
    for file, broken, _ in found:
        if broken:
            return DataError(f"{file}: {broken}")
    for file, _, unlike in found:
        if unlike:
            return DataError(f"{file}: {unlike}")
    while error.__cause__ is not None:
        error = error.__cause__
    return DataError(f"{source}: cannot be read ({type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]})")


def _scan(path: Path) -> tuple[str | None, str | None]:
    """``(broken, unlike)`` for a data file: the first place where it is not valid UTF-8 or not
    valid JSON (or CSV), or ``no rows``; the first value of another kind than its column's first."""
    builder = _builder(path)
    if builder == "parquet" and path.suffix == ".parquet":
        import pyarrow.parquet

        with contextlib.suppress(Exception):
            return ("no rows" if pyarrow.parquet.read_metadata(path).num_rows == 0 else None), None
    if builder not in ("json", "csv") or path.suffix == ".zst":
        return None, None
    first, unlike, count = {}, None, 0
    try:
        for count, kinds in enumerate(_json_kinds(path) if builder == "json" else _csv_kinds(path), 1):
            for column, kind in kinds.items():
                row, was = first.setdefault(column, (count - 1, kind)) if kind else (0, None)
                if unlike is None and was not in (None, kind):
                    unlike = f"row {count - 1}, column {column!r}: a {kind}, unlike row {row} (a {was})"
    except DataError as broken:
        return str(broken), None
    return ("no rows" if count == 0 else None), unlike


def _lines(path: Path):
    """The lines of a (packed) text file as ``(number, text)``; invalid UTF-8 is a ``DataError``."""
    offset, number = 0, 0
    try:
        with (_PACKED.get(path.suffix) or open)(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    yield number, line.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"line {number}, byte {offset + error.start}: not valid UTF-8 "
                                    f"(data files are read as UTF-8)") from None
                offset += len(line)
    except (OSError, EOFError, lzma.LZMAError) as error:  # a .gz/.bz2/.xz file that is not one, or cut short
        raise DataError(f"not a valid {path.suffix} file ({' '.join(str(error).split())})") from None


def _json_kinds(path: Path):
    """Per object of a JSON lines file (or of a JSON file holding a list of them), the kind of
    each value."""
    lines = _lines(path)
    for number, text in lines:
        text = text.lstrip("\ufeff") if number == 1 else text
        if text.strip():
            break
    else:
        return
    if text.lstrip().startswith("["):  # one JSON list
        try:
            records = json.loads(text + "".join(t for _, t in lines))
        except json.JSONDecodeError as error:
            raise DataError(f"line {number - 1 + error.lineno}, column {error.colno}: not valid JSON "
                            f"({error.msg.removesuffix(' at')})") from None
        yield from (_kinds(r, f"item {k}") for k, r in enumerate(records))
        return
    for number, text in itertools.chain([(number, text)], lines):
        if not text.strip():
            continue
        try:
            record = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as error:
            raise DataError(f"line {number}, column {error.pos + 1}: not valid JSON ({error.msg.removesuffix(' at')})"
                            ) from None
        yield _kinds(record, f"line {number}")


def _kinds(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object of columns, got {type(record).__name__}")
    kinds = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "mapping"}
    return {column: None if value is None else kinds.get(type(value)) for column, value in record.items()}


def _csv_kinds(path: Path):
    """Per row of a CSV file, the kind of each cell: a number, a string, or None where empty."""
    reader = csv.reader(text for _, text in _lines(path))
    header = next(reader, [])
    for cells in reader:
        if len(cells) != len(header):
            raise DataError(f"line {reader.line_num}: {len(cells)} fields where the header has {len(header)}")
        yield {column: ("number" if _number(cell) else "string") if cell else None
               for column, cell in zip(header, cells)}


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
