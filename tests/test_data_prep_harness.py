"""The data-preparation benchmark's harness (benchmarks/data_prep.py) without running a trainer: its
workload is deterministic and streamed, its children's options follow the configs, its report
applies the data-path targets."""

import dataclasses
import json

from benchmarks import data_prep


def test_rows_are_deterministic_and_shaped(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    data_prep.write_rows(a, "dpo", 50)
    data_prep.write_rows(b, "dpo", 80)
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 50 and b.read_text().startswith(a.read_text())  # a smaller size is a prefix
    assert not list(tmp_path.glob("*.tmp"))
    row = rows[0]
    assert row["prompt"].startswith("\n\nHuman: ") and row["prompt"].endswith("\n\nAssistant:")
    assert row["chosen"].startswith(" ") and row["chosen"] != row["rejected"]
    assert data_prep.texts_of(row, "dpo") == [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
    sft = data_prep.Prose().sft()
    assert sft["text"].startswith("\n\nHuman: ") and "\n\nAssistant: " in sft["text"]
    assert 80 <= len(sft["text"].split()) <= 180


def test_config_takes_only_the_fields_it_has():
    @dataclasses.dataclass
    class Config:
        max_length: int = 0
        dataset_num_proc: int | None = None

    config, took = data_prep.config_of(Config, {"max_length": 512}, {"dataset_num_proc": 2, "max_prompt_length": 128})
    assert config == Config(512, 2) and took == {"dataset_num_proc": True, "max_prompt_length": False}


def _record(system, phase, seconds, peak, loaded=1 << 30, **extra):
    return {"system": system, "phase": phase, "status": "ok", "seconds": seconds, "loaded_rss": loaded,
            "peak_rss": peak, "built_peak_rss": loaded, "prepare_seconds": seconds / 2, **extra}


def test_report_applies_the_targets():
    tokens = 1_000_000_000
    records = {("sft", 1_000_000, "floor", "run"): _record("floor", "run", 40.0, 0, tokens=tokens),
               ("sft", 1_000_000, "fastalign", "first"): _record("fastalign", "first", 50.0,
                                                                 (1 << 30) + 7 * tokens // 2),
               ("sft", 1_000_000, "fastalign", "cached"): _record("fastalign", "cached", 5.0, (1 << 30) + tokens),
               ("sft", 1_000_000, "trl", "first"): {"system": "trl", "phase": "first", "status": "timeout"}}
    cells = dict(zip(data_prep.HEADER, data_prep.table_row(records, "sft", 1_000_000)))
    assert cells["fastalign first s (x floor)"] == "50.0 (1.2x)"
    assert cells["fastalign prepare s first / cached"] == "25.0 / 2.5"
    assert cells["fastalign B/token first / cached"] == "3.5 / 1.0"
    checks = [cells[c] for c in data_prep.CHECK_COLUMNS]
    assert checks == ["pass", "n/a", "pass", "FAIL"]  # 1M rows: no 15 s target; peak 4.3 GiB
    assert cells["TRL first s (x floor)"] == "timeout" and cells["TRL cached s"] == "-"
