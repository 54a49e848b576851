"""Mistakes in data files and rows: each is one ``DataError`` line naming the file, the row (or the
line) and the column; local paths never go to the Hub; split names are honoured or refused."""

import gzip
import json
import os
import re
import time

import datasets
import huggingface_hub.constants
import pytest

from fastalign.data import PairEncoder, SFTEncoder, load_rows, tokenize_pairs, tokenize_sft
from fastalign.data.prompts import tokenize_prompts
from fastalign.data.store import PAIR_HALVES, SFT_HALVES, StreamBatches, tokenize_rows
from fastalign.errors import ConfigError, DataError
from fastalign.models.tiny import char_tokenizer

TOK = char_tokenizer()
PAIRS = [{"prompt": f"{i}=", "chosen": "ab", "rejected": "ba"} for i in range(10)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def named(path, what):
    """The pattern of a one-line error about ``path``."""
    return rf"^{re.escape(str(path))}: {what}"


@pytest.fixture
def hub_unreachable(monkeypatch):
    """The Hub's address points at a closed local port: every request to it fails at once."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")


# Row errors name the file the rows came from, whatever tokenizes them.

def test_a_bad_row_names_the_file_in_worker_processes_and_in_one(tmp_path):
    rows = [{"text": "ab"}] * 100
    rows[77] = {"text": ""}
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    for num_proc in (2, 1):
        with pytest.raises(DataError, match=named(path, r"row 77, column 'text': empty$")):
            tokenize_rows(load_rows(str(path)), SFTEncoder(TOK), SFT_HALVES, num_proc=num_proc)


def test_bad_pairs_prompts_and_streams_name_the_file(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3] + [{"prompt": "3=", "chosen": "ab", "rejected": "ab"}])
    with pytest.raises(DataError, match=named(pairs, "row 3: chosen and rejected are the same")):
        tokenize_rows(load_rows(str(pairs)), PairEncoder(TOK), PAIR_HALVES)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"query": "1="}, {"text": "x"}])
    with pytest.raises(DataError, match=named(prompts, "dataset row 1")):
        tokenize_prompts(load_rows(str(prompts)), TOK)
    stream = write_jsonl(tmp_path / "stream.jsonl", [{"text": "ab"}] * 5 + [{"text": 3}])
    batches = StreamBatches(load_rows(str(stream), streaming=True), SFTEncoder(TOK), SFT_HALVES,
                            lambda store: [[i] for i in store.kept.tolist()], window=4, seed=None)
    with pytest.raises(DataError, match=named(stream, "row 5, column 'text': expected a string, got int")):
        batches.take(6)


# Files that cannot be read.

def _empty_parquet(path):
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features(text=datasets.Value("string"))).to_parquet(
        str(path))


@pytest.mark.parametrize("name, write", [
    ("empty.jsonl", lambda p: p.write_text("")),
    ("blank.jsonl", lambda p: p.write_text("\n\n")),
    ("empty.json", lambda p: p.write_text("[]")),
    ("empty.csv", lambda p: p.write_text("")),
    ("header.csv", lambda p: p.write_text("prompt,completion\n")),
    ("empty.jsonl.gz", lambda p: p.write_bytes(gzip.compress(b""))),
    ("empty.parquet", _empty_parquet),
])
def test_a_file_without_rows_says_so(tmp_path, name, write):
    write(tmp_path / name)
    with pytest.raises(DataError, match=named(tmp_path / name, "no rows$")):
        load_rows(str(tmp_path / name))


def test_a_truncated_json_line_is_named_by_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c\n')
    with pytest.raises(DataError, match=named(path, r"line 4, column \d+: not valid JSON")):
        load_rows(str(path))
    packed = tmp_path / "rows.jsonl.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(DataError, match=named(packed, r"line 4, column \d+: not valid JSON")):
        load_rows(str(packed))


@pytest.mark.parametrize("name, data, line, byte", [
    ("rows.jsonl", b'{"text": "a"}\n{"text": "\xff\xfe"}\n', 2, 24),
    ("rows.csv", b'text\na\n\xffb\n', 3, 7),
    ("rows.json", b'[{"text": "a"},\n {"text": "b\xe9"}]', 2, 28),
])
def test_invalid_utf8_is_named_by_line_and_byte(tmp_path, name, data, line, byte):
    path = tmp_path / name
    path.write_bytes(data)
    assert data[byte] >= 0x80 and data[:byte].count(b"\n") == line - 1  # the figures the message gives
    with pytest.raises(DataError, match=named(path, f"line {line}, byte {byte}: not valid UTF-8")):
        load_rows(str(path))


def test_a_value_unlike_its_column_is_named_by_its_row(tmp_path):
    # datasets reads a JSON lines file 10 MB at a time and casts the later chunks to the types of
    # the first: a row of the second chunk whose value does not cast is the bad row.
    rows = [{"text": "x" * 10_000, "score": i} for i in range(1100)]
    rows[1050]["score"] = "high"
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert path.stat().st_size > 10 << 20
    with pytest.raises(DataError, match=named(path, "row 1050, column 'score': a string, unlike row 0 .a number.")):
        load_rows(str(path))
    # In a CSV file a number column with one word in it is read as text: the word is the bad row.
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected,margin\n" + "".join(f"p,a,b,{'x' if i == 7 else 1.5}\n" for i in range(10)))
    with pytest.raises(DataError, match=named(csv, "row 7, column 'margin': expected a finite number, got 'x'")):
        tokenize_rows(load_rows(str(csv)), PairEncoder(TOK), PAIR_HALVES)


def test_a_column_of_mixed_kinds_is_named_by_its_row_not_changed(tmp_path):
    # datasets keeps such a column as JSON and decodes every text that reads as JSON: the completion
    # "0278" came back as the number 278, and the error named row 0.
    rows = [{"prompt": f"{i}=", "completion": "0278"} for i in range(8)]
    rows[5]["completion"] = 1
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=named(path, "row 5, column 'completion': a number, unlike row 0 .a string.$")):
        load_rows(str(path))
    rows[5]["completion"] = None  # a missing value is no other kind
    assert load_rows(str(write_jsonl(path, rows)))["completion"][:6] == ["0278"] * 5 + [None]


def test_csv_margins_that_are_not_finite_and_text_that_looks_missing(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected,margin\n" + "".join(f"p,a,b,{'nan' if i == 4 else 2}\n" for i in range(6)))
    with pytest.raises(DataError, match=named(csv, "row 4, column 'margin': expected a finite number, got 'nan'")):
        tokenize_rows(load_rows(str(csv)), PairEncoder(TOK), PAIR_HALVES)
    csv.write_text("prompt,chosen,rejected,margin\nNA,a,b,1\nnull,a,b,\n")  # texts, and a row without margin
    rows = load_rows(str(csv))
    assert rows["prompt"] == ["NA", "null"] and rows["margin"] == ["1", None]  # read as a number where used
    pairs, _ = tokenize_pairs(rows, TOK)
    assert [TOK.decode(p.chosen_prompt) for p in pairs] == ["NA", "null"] and [p.margin for p in pairs] == [1.0, None]


def test_csv_cells_are_text_as_written(tmp_path):
    # pandas reads a column of digits as numbers: the completion "0278" would be 278, and refused.
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,completion\n8720=,0278\n12=,12\n")
    rows = load_rows(str(csv))
    assert rows["prompt"] == ["8720=", "12="] and rows["completion"] == ["0278", "12"]
    sequences, _ = tokenize_sft(rows, TOK)
    assert TOK.decode(sequences[0].input_ids) == "8720=0278" + TOK.eos_token
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text(csv.read_text())
    assert load_rows(str(tmp_path / "data"))["completion"] == ["0278", "12"]


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "rows.jsonl.xz", "rows.jsonl.bz2"])
def test_a_packed_file_that_is_not_packed_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match=named(path, rf"not a valid \{path.suffix} file")):
        load_rows(str(path))


# Chat rows.

def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = chat(("user", "hi"), ("assistant", "ok"))


@pytest.mark.parametrize("row, what", [
    (chat(("user", "hi"), ("bot", "ok")), r"message 1 has the role 'bot' \(expected system, user or assistant\)"),
    (chat(("user", "hi"), ("assitant", "ok")), r"message 1 has the role 'assitant' \(expected system, user or"),
    (chat(("user", "hi"), ("assistant", None)), r"message 1 \(assistant\): content is null \(expected text\)"),
    (chat(("user", "hi"), ("assistant", 3)), r"message 1 \(assistant\): content is int \(expected text\)"),
    (chat(("user", "hi"), ("assistant", "")), r"message 1 \(assistant\): empty"),
    (chat(("system", "be brief"), ("user", "hi")), "no assistant message to learn from"),
])
def test_bad_chat_rows_name_row_column_and_message(row, what):
    with pytest.raises(DataError, match=rf"^row 1, column 'messages': {what}"):
        tokenize_sft([GOOD, row], TOK)


def test_a_chat_without_assistant_turns_trains_when_every_token_carries_a_loss():
    sequences, report = tokenize_sft([chat(("user", "hi"))], TOK, completion_only_loss=False)
    assert report.dropped == 0 and all(sequences[0].loss_mask[1:])


# Preference rows.

def test_a_null_prompt_is_not_an_implicit_prompt():
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    for row in ({"prompt": None, "chosen": "ab", "rejected": "ba"},
                {"prompt": None, "chosen": conversation, "rejected": conversation[:1] + [{"role": "assistant",
                                                                                          "content": "no"}]}):
        with pytest.raises(DataError, match=r"^row 1, column 'prompt': null"):
            tokenize_pairs([PAIRS[0], row], TOK)
    (pair,), _ = tokenize_pairs([{"chosen": "ab", "rejected": "ac"}], TOK)  # no prompt column: implicit
    assert TOK.decode(pair.chosen_prompt) == "a"


# Token ids given as data.

@pytest.mark.parametrize("encoder, halves, row, column", [
    (SFTEncoder(TOK), SFT_HALVES, {"input_ids": [5, 99999]}, "input_ids"),
    (SFTEncoder(TOK), SFT_HALVES, {"input_ids": [5, -3, 7]}, "input_ids"),
    (PairEncoder(TOK), PAIR_HALVES, {"input_ids_chosen": [5, 6, 100], "input_ids_rejected": [5, 7]}, "input_ids_chosen"),
])
def test_a_token_id_outside_the_vocabulary_is_named_by_its_row(tmp_path, encoder, halves, row, column):
    # It failed at the first step as "IndexError: index out of range in self".
    good = {"input_ids": [5, 6, 7]} if halves == SFT_HALVES else {"input_ids_chosen": [5, 6], "input_ids_rejected": [5, 7]}
    path = write_jsonl(tmp_path / "ids.jsonl", [good] * 5 + [row])
    with pytest.raises(DataError, match=named(path, f"row 5, column '{column}': token id -?\\d+ is not an id of the "
                                                    r"tokenizer \(expected 0 to 99, the tokenizer's\)")):
        tokenize_rows(load_rows(str(path)), encoder, halves)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"input_ids": [5, 6]}] * 5 + [{"input_ids": [5, 100]}])
    with pytest.raises(DataError, match=named(prompts, "row 5, column 'input_ids': token id 100 is not an id")):
        tokenize_prompts(load_rows(str(prompts)), TOK)


# Split names.

def test_a_single_file_holds_the_train_split_only(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", PAIRS)
    assert len(load_rows(str(path), split="train")) == 10
    with pytest.raises(ConfigError, match=named(path, "no split 'test': a single data file holds one split, 'train'")
                       ) as error:
        load_rows(str(path), split="test")
    assert "dataset_test_split" in str(error.value) and "\n" not in str(error.value)


def test_a_folder_of_files_has_the_splits_of_their_names(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    write_jsonl(tmp_path / "test.jsonl", PAIRS[:2])
    assert len(load_rows(str(tmp_path), split="test")) == 2
    with pytest.raises(ConfigError, match=named(tmp_path, r"no split 'validation' \(it has 'test', 'train'\)$")):
        load_rows(str(tmp_path), split="validation")
    # The rows of a split of one file name that file.
    test = write_jsonl(tmp_path / "test.jsonl", PAIRS[:2] + [{"prompt": "", "chosen": "ab", "rejected": "ba"}])
    with pytest.raises(DataError, match=named(test, "row 2, column 'prompt': empty")):
        tokenize_rows(load_rows(str(tmp_path), split="test"), PairEncoder(TOK), PAIR_HALVES)
    # datasets reads every split of a folder: a broken file is named whichever split is asked for.
    test.write_text('{"prompt": "1=", "chosen": "ab", "rejected": "ba"}\n{"prompt"\n')
    for split in ("train", "test"):
        with pytest.raises(DataError, match=named(test, r"line 2, column \d+: not valid JSON")):
            load_rows(str(tmp_path), split=split)


def test_a_configuration_name_for_a_local_path_is_refused(tmp_path):
    # It was ignored for a file, and a ValueError of datasets (status 1) for a folder.
    path = write_jsonl(tmp_path / "rows.jsonl", PAIRS)
    with pytest.raises(ConfigError, match=rf"^dataset_config 'foo': {path} is a local file, which has no configurations"):
        load_rows(str(path), name="foo")
    with pytest.raises(ConfigError, match=rf"^dataset_config 'foo': {tmp_path} is a local folder"):
        load_rows(str(tmp_path), name="foo")


# Local paths and the Hub.

@pytest.mark.parametrize("name", ["pairs.jsonl", "data/pairs.jsonl", "./pairs", "~/no-such-fastalign-file.jsonl",
                                  "data/pairs", "pairs.csv.gz"])
def test_a_local_path_that_does_not_exist_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(name)}: no such file or folder .*{re.escape(os.getcwd())}"):
        load_rows(name)
    assert time.monotonic() - start < 2


def test_a_hub_data_set_while_the_hub_is_unreachable_fails_at_once(hub_unreachable):
    start = time.monotonic()
    with pytest.raises(ConfigError, match="^data set 'fastalign-tests/no-such-set': the Hugging Face Hub could not be"):
        load_rows("fastalign-tests/no-such-set")
    assert time.monotonic() - start < 5
