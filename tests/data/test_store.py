"""Token stores: tokenized once (in worker processes too), cached, memory-mapped, packed per step;
streamed data sets packed window by window with flat memory."""

import json
import os

import datasets
import numpy as np
import pytest

from fastalign.algorithms import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from fastalign.data import SFTEncoder, pack_all, tokenize_sft
from fastalign.data.store import SFT_HALVES, sft_store, tokenize_rows
from fastalign.engine.metrics import read_metrics
from fastalign.models.tiny import char_tokenizer, tiny_model
from fastalign.tasks.sort_digits import make_preference_pairs

TOK = char_tokenizer()
ROWS = [{"prompt": f"{a} {b}=", "completion": str(a * b)} for a in range(9) for b in range(7)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def columns(table):
    return {name: table.column(name).to_pylist() for name in table.column_names}


def test_worker_processes_tokenize_like_one_process_and_keep_the_row_order():
    rows = [{"text": f"{i} " * (1 + i % 5)} for i in range(200)]
    encode = SFTEncoder(TOK, max_length=6)
    one = tokenize_rows(rows, encode, SFT_HALVES)  # in memory, one call
    two = tokenize_rows(datasets.Dataset.from_list(rows), encode, SFT_HALVES, num_proc=2)
    assert columns(one) == columns(two)
    store = sft_store(two)
    lengths = [len(TOK(r["text"])["input_ids"]) + 1 for r in rows]  # with the EOS
    assert store.report.rows == 200 and store.report.truncated == sum(n > 6 for n in lengths) > 0
    # Row i's tokens are row i's text, in the data set's order.
    assert store.unit(38)[0].input_ids.tolist() == TOK("38 38 38 38 ")["input_ids"][:6]


def test_a_bad_row_in_a_worker_process_is_named_by_its_row_in_the_data_set():
    rows = [{"text": "ab"}] * 100
    rows[77] = {"text": ""}
    with pytest.raises(ValueError, match=r"row 77, column 'text': empty"):
        tokenize_rows(datasets.Dataset.from_list(rows), SFTEncoder(TOK), SFT_HALVES, num_proc=2)


CALLS = []


def counted_text(row):
    """A formatting function that records each call in a file (the test reads how often it ran)."""
    with open(os.environ["FASTALIGN_TEST_CALLS"], "a") as f:
        f.write("x\n")
    return row["prompt"] + row["completion"]


def test_a_second_run_reads_the_cache_and_the_store_is_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FASTALIGN_TEST_CALLS", str(calls))
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    stores = []
    for _ in range(2):
        rows = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "cache"))
        stores.append(sft_store(tokenize_rows(rows, SFTEncoder(TOK, formatting_func=counted_text), SFT_HALVES)))
    assert len(calls.read_text().splitlines()) == len(ROWS)  # the second run tokenized nothing
    assert columns(stores[0].table) == columns(stores[1].table)
    ids = stores[1].halves[0].ids.values[0]
    assert not ids.flags.owndata and not ids.flags.writeable  # a view of the memory-mapped cache file


def test_batches_are_built_when_read_and_equal_packing_the_sequences(tmp_path):
    trainer = SFTTrainer(tiny_model("llama", hidden_size=32, layers=1, heads=2), tokenizer=TOK,
                         args=SFTConfig(output_dir=str(tmp_path), max_tokens_per_batch=64, disable_tqdm=True),
                         train_dataset=ROWS)
    seqs, _ = tokenize_sft(ROWS, TOK)
    want = pack_all([[s] for s in seqs], 64)
    got = list(trainer.train_batches)
    assert len(got) == len(want) > 1
    for a, b in zip(got, want):
        for key in ("input_ids", "position_ids", "cu_seqlens", "labels", "seq_index"):
            assert getattr(a, key).tolist() == getattr(b, key).tolist()
    assert [trainer.train_batches.weight(k) for k in range(len(got))] == [b.num_loss_tokens for b in want]


def test_a_too_long_row_is_named():
    rows = [{"text": "ab"}, {"text": "abcdefghijklmnopqrstuvwxyz" * 4}]
    with pytest.raises(ValueError, match=r"row 1 has 105 tokens, more than max_tokens_per_batch=64"):
        SFTTrainer(tiny_model("llama", hidden_size=32, layers=1, heads=2), tokenizer=TOK, train_dataset=rows,
                   args=SFTConfig(max_length=None, max_tokens_per_batch=64, disable_tqdm=True))


def sft_run(out, data, **overrides):
    options = dict(output_dir=str(out), learning_rate=1e-2, max_tokens_per_batch=64, disable_tqdm=True, seed=0,
                   shuffle=False)
    options.update(overrides)
    trainer = SFTTrainer(tiny_model("llama", hidden_size=32, layers=1, heads=2, seed=1), tokenizer=TOK,
                         args=SFTConfig(**options), train_dataset=data)
    trainer.train()
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def test_a_stream_in_one_window_trains_like_the_data_set(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    whole = sft_run(tmp_path / "whole", str(data))
    streamed = sft_run(tmp_path / "streamed", str(data), streaming=True, stream_window_rows=len(ROWS),
                       max_steps=len(whole))
    assert streamed == pytest.approx(whole, rel=1e-6)


def test_a_stream_goes_round_again_at_its_end_and_names_bad_rows(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS[:10])
    losses = sft_run(tmp_path / "a", str(data), streaming=True, stream_window_rows=4, max_steps=12)
    assert len(losses) == 12
    bad = write_jsonl(tmp_path / "bad.jsonl", ROWS[:10] + [{"prompt": "1=", "completion": ""}])
    with pytest.raises(ValueError, match=r"row 10, column 'completion': empty"):
        sft_run(tmp_path / "b", str(bad), streaming=True, stream_window_rows=4, max_steps=12)
    with pytest.raises(ValueError, match="set max_steps"):
        sft_run(tmp_path / "c", str(data), streaming=True)


def test_a_stream_of_pairs_trains_dpo(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_preference_pairs(20, seed=0))
    trainer = DPOTrainer(tiny_model("llama", hidden_size=32, layers=1, heads=2), tokenizer=TOK, train_dataset=str(data),
                         args=DPOConfig(output_dir=str(tmp_path / "run"), streaming=True, stream_window_rows=8,
                                        max_steps=4, max_tokens_per_batch=128, disable_tqdm=True))
    result = trainer.train()
    assert result["steps"] == 4 and np.isfinite(result["train_loss"])


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_stream_larger_than_its_window_trains_with_flat_memory(tmp_path):
    """40,000 rows (about 4.7M tokens), a window of 256 rows: memory over 60 steps (through about
    six windows) does not grow with the rows read."""
    rng = np.random.default_rng(0)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for n in rng.integers(40, 200, size=40_000):
            f.write(json.dumps({"text": "".join(rng.choice(list("0123456789 =+"), size=int(n)))}) + "\n")

    rss = []

    class Measured(SFTTrainer):
        def compute_loss(self, batch):
            rss.append(current_rss_bytes())
            return super().compute_loss(batch)

    trainer = Measured(tiny_model("llama", hidden_size=16, layers=1, heads=2), tokenizer=TOK, train_dataset=str(path),
                       args=SFTConfig(output_dir=str(tmp_path / "run"), streaming=True, stream_window_rows=256,
                                      max_steps=60, max_tokens_per_batch=4096, disable_tqdm=True))
    trainer.train()
    assert trainer.train_batches.start >= 5 * 256  # read well past the first windows
    early, late = np.median(rss[5:15]), np.median(rss[-10:])
    assert late - early < 24 * 2**20, f"RSS grew by {(late - early) / 2**20:.1f} MiB over the run"
