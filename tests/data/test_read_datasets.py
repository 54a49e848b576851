"""Reading datasets from files, folders and memory."""

import gzip
import json

import datasets
import pytest

from fastalign.data import load_rows
from fastalign.errors import ConfigError

ROWS = [{"prompt": "3 1=", "completion": "1 3"}, {"prompt": "2 2 0=", "completion": "0 2 2"}]


def _write(path, rows):
    if path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if path.suffix == ".gz":
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.parquet", "rows.csv", "rows.jsonl.gz"])
def test_data_files(tmp_path, name):
    path = tmp_path / name
    _write(path, ROWS)
    got = load_rows(str(path))
    assert [dict(r) for r in got] == ROWS


def test_saved_dataset_folder_and_memory(tmp_path):
    data = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    data.save_to_disk(str(tmp_path / "saved"))
    assert len(load_rows(str(tmp_path / "saved"), split="test")) == 1
    assert load_rows(data["train"]) is data["train"] and load_rows(ROWS) is ROWS
    with pytest.raises(ConfigError, match=r"no split 'validation' \(it has 'test', 'train'\)"):
        load_rows(data, split="validation")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'saved'}: no split 'validation'"):
        load_rows(str(tmp_path / "saved"), split="validation")


def test_missing_and_unknown_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown data file type"):
        load_rows(str(tmp_path / "rows.txt"))
