"""The battery's one-command cases (``benchmarks.battery``): bad data files and rows, bad configs,
bad models, and valid inputs whose results are checked. A bad row is row 5 (the sixth), so an error
must name the row it found, not the first."""

from __future__ import annotations

import gzip
import json
import math

from benchmarks.battery import (
    DATA,
    DELETE,
    PAIRS,
    PROMPTS,
    SFT,
    Case,
    all_of,
    finished,
    jsonl,
    logged,
    says,
    with_row,
)

R5 = ("row 5", "line 6")  # the sixth row, as a row index or a line number


def plotted(run) -> str | None:
    """``fastalign train`` drew the run's curves into ``out/plots``."""
    return None if list((run.dir / "out" / "plots").glob("*.png")) else "no plots in out/plots"


def bad(name, algo, mentions, **kw) -> Case:
    return Case(name, algo, expect=kw.pop("expect", "usage"), mentions=tuple(mentions), group=kw.pop("group", "config"),
                **kw)


def ok(name, algo, check=None, **kw) -> Case:
    return Case(name, algo, expect="ok", check=check, group=kw.pop("group", "valid"), **kw)


def row5(algo, row, name="data.jsonl") -> dict:
    return {name: with_row(DATA[algo], 5, row)}


def csv_text(rows, columns) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def parquet(rows):
    def write(path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return write


def chat(i, text):
    return {"messages": [{"role": "user", "content": text["prompt"]}, {"role": "assistant", "content": text["completion"]}]}


CHATS = [chat(i, r) for i, r in enumerate(SFT)]
CHAT_PAIRS = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
               "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
              for r in PAIRS]
IMPLICIT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in PAIRS]
TRUNCATED = jsonl(SFT)[:-20]
BAD_UTF8 = jsonl(SFT[:5]).encode() + b'{"prompt": "12\xff3=", "completion": "123"}\n' + jsonl(SFT[6:]).encode()
LONG = "7" * 3000


# The per-algorithm data cases each algorithm skips (the same code path as another's).
SKIP = {"reward": ("data-hub-name-offline", "data-wrong-suffix", "data-row-is-a-list", "data-split-validation",
                   "valid-csv", "valid-parquet"),
        "dpo": ("data-wrong-suffix", "data-split-validation", "valid-parquet"),
        "ppo": ("data-hub-name-offline", "data-row-is-a-list", "valid-csv"),
        "sft": ("valid-parquet",)}


def data_cases() -> list[Case]:
    out = []
    for algo, rows in (("sft", SFT), ("reward", PAIRS), ("dpo", PAIRS), ("ppo", PROMPTS)):
        g = {"group": "data"}
        out += [
            bad(f"{algo}/data-missing-relative", algo, ["nope.jsonl"], config={"dataset_name": "nope.jsonl"}, **g),
            bad(f"{algo}/data-empty-file", algo, ["data.jsonl", ("no rows", "empty")], files={"data.jsonl": ""}, **g),
            bad(f"{algo}/data-truncated-jsonl", algo, ["data.jsonl", "line 32"],
                files={"data.jsonl": jsonl(rows)[:-9]}, **g),
            bad(f"{algo}/data-wrong-suffix", algo, ["data.txt"], files={"data.txt": jsonl(rows)},
                config={"dataset_name": "data.txt"}, **g),
            bad(f"{algo}/data-row-is-a-list", algo, ["data.jsonl", R5], files={"data.jsonl": with_row(rows, 5, "[1, 2]")},
                **g),
            bad(f"{algo}/data-hub-name-offline", algo, [("someone/no-such-data",)],
                config={"dataset_name": "someone/no-such-data"}, expect="error", **g),
            bad(f"{algo}/data-split-validation", algo, ["validation"], config={"dataset_train_split": "validation"}, **g),
            ok(f"{algo}/valid-baseline", algo, all_of(finished(), plotted)),
            ok(f"{algo}/valid-csv", algo, files={"data.csv": csv_text(rows, list(rows[0]))},
               config={"dataset_name": "data.csv"}),
            ok(f"{algo}/valid-parquet", algo, files={"data.parquet": parquet(rows)}, config={"dataset_name": "data.parquet"}),
        ]
        out = [c for c in out if not c.name.startswith(f"{algo}/") or c.name.split("/")[1] not in SKIP.get(algo, ())]
    out += [bad(f"{algo}/data-test-split-on-one-file", algo, ["test"], config={"dataset_test_split": "test"}, group="data")
            for algo in ("sft", "dpo")]
    g = {"group": "data"}
    out += [
        bad("sft/data-bad-utf8", "sft", ["data.jsonl", R5, "utf-8"], files={"data.jsonl": BAD_UTF8}, **g),
        bad("dpo/data-bad-utf8", "dpo", ["data.jsonl", "utf-8"],
            files={"data.jsonl": jsonl(PAIRS).encode().replace(b'"17581=', b'"17\xfe581=')}, **g),
        bad("sft/data-directory-empty", "sft", ["datadir"], files={"datadir/readme.md": "no data here"},
            config={"dataset_name": "datadir"}, **g),
        ok("sft/valid-folder", "sft", files={"datadir/train.jsonl": SFT}, config={"dataset_name": "datadir"}),
        ok("sft/valid-folder-test-split", "sft", all_of(finished(), logged("eval/loss")),
           files={"datadir/train.jsonl": SFT, "datadir/test.jsonl": SFT[:8]},
           config={"dataset_name": "datadir", "dataset_test_split": "test"}),
        bad("sft/data-folder-missing-split", "sft", ["validation"], files={"datadir/train.jsonl": SFT},
            config={"dataset_name": "datadir", "dataset_test_split": "validation"}, **g),
        ok("sft/valid-json-array", "sft", files={"data.json": json.dumps(SFT)}, config={"dataset_name": "data.json"}),
        ok("sft/valid-jsonl-gz", "sft", files={"data.jsonl.gz": gzip.compress(jsonl(SFT).encode())},
           config={"dataset_name": "data.jsonl.gz"}),
        ok("sft/valid-bom-blank-lines", "sft", files={"data.jsonl": "\ufeff" + jsonl(SFT[:10]) + "\n\n" + jsonl(SFT[10:])}),
        ok("sft/valid-split-slice", "sft", config={"dataset_train_split": "train[:16]"}),
        bad("sft/data-not-gzip", "sft", ["data.jsonl.gz"], files={"data.jsonl.gz": jsonl(SFT)},
            config={"dataset_name": "data.jsonl.gz"}, **g),
        bad("sft/data-corrupt-parquet", "sft", ["data.parquet"], files={"data.parquet": b"PAR1 this is not parquet"},
            config={"dataset_name": "data.parquet"}, **g),
        bad("sft/data-csv-short-line", "sft", ["data.csv", ("line 7", "row 5")],
            files={"data.csv": csv_text(SFT, ["prompt", "completion"]).replace(f"\n{SFT[5]['prompt']},", "\n0,0,")},
            config={"dataset_name": "data.csv"}, **g),
        bad("sft/data-json-array-truncated", "sft", ["data.json"], files={"data.json": json.dumps(SFT)[:-30]},
            config={"dataset_name": "data.json"}, **g),
    ]
    return out


def row_cases() -> list[Case]:
    g = {"group": "rows"}
    sft = [
        ("sft/row-wrong-columns", {"data.jsonl": [{"question": r["prompt"], "answer": r["completion"]} for r in SFT]},
         ["data.jsonl", ("text", "prompt")]),
        ("sft/row-completion-int", row5("sft", {"prompt": "1=", "completion": 1}), ["data.jsonl", R5, "completion"]),
        ("sft/row-completion-null", row5("sft", {"prompt": "1=", "completion": None}), ["data.jsonl", R5, "completion"]),
        ("sft/row-prompt-empty", row5("sft", {"prompt": "", "completion": "1"}), ["data.jsonl", R5, "prompt"]),
        ("sft/row-prompt-list", {"data.jsonl": with_row(SFT, 20, {"prompt": ["1="], "completion": "1"})},
         ["data.jsonl", ("row 20", "line 21"), "prompt"]),
        ("sft/row-missing-completion", row5("sft", {"prompt": "1="}), ["data.jsonl", R5, "completion"]),
        ("sft/chat-bad-role", {"data.jsonl": with_row(CHATS, 5, {"messages": [{"role": "bot", "content": "1"}]})},
         ["data.jsonl", R5, "bot"]),
        ("sft/chat-misspelled-role", {"data.jsonl": with_row(CHATS, 5, {"messages": [
            {"role": "user", "content": "1="}, {"role": "asistant", "content": "1"}]})}, ["data.jsonl", R5, "asistant"]),
        ("sft/chat-content-null", {"data.jsonl": with_row(CHATS, 5, {"messages": [
            {"role": "user", "content": "1="}, {"role": "assistant", "content": None}]})}, ["data.jsonl", R5, "content"]),
        ("sft/chat-no-assistant", {"data.jsonl": with_row(CHATS, 5, {"messages": [{"role": "user", "content": "1="}]})},
         ["data.jsonl", R5, "assistant"]),
        ("sft/chat-not-a-list", {"data.jsonl": with_row(CHATS, 5, {"messages": "hello"})}, ["data.jsonl", R5, "messages"]),
        ("sft/chat-empty-list", {"data.jsonl": with_row(CHATS, 5, {"messages": []})}, ["data.jsonl", R5, "messages"]),
        ("sft/ids-strings", {"data.jsonl": with_row([{"input_ids": [5, 6, 7, 8]}] * 32, 5, {"input_ids": ["a", "b"]})},
         ["data.jsonl", R5, "input_ids"]),
        ("sft/ids-out-of-vocab", {"data.jsonl": with_row([{"input_ids": [5, 6, 7, 8]}] * 32, 5, {"input_ids": [5, 99999]})},
         ["data.jsonl", R5, "input_ids"]),
        ("sft/ids-negative", {"data.jsonl": with_row([{"input_ids": [5, 6, 7, 8]}] * 32, 5, {"input_ids": [5, -3, 7]})},
         ["data.jsonl", R5, "input_ids"]),
        ("sft/ids-labels-length", {"data.jsonl": with_row([{"input_ids": [5, 6, 7, 8]}] * 32, 5,
                                                           {"input_ids": [5, 6, 7], "labels": [5, 6]})},
         ["data.jsonl", R5, "labels"]),
    ]
    out = [bad(n, "sft", m, files=f, **g) for n, f, m in sft]
    out += [
        bad("sft/row-text-field-missing", "sft", ["body"], files={"data.jsonl": [{"text": r["prompt"] + r["completion"]}
                                                                               for r in SFT]},
            config={"dataset_text_field": "body"}, **g),
        ok("sft/valid-chat", "sft", files={"data.jsonl": CHATS}),
        ok("sft/valid-input-ids", "sft", files={"data.jsonl": [{"input_ids": [5 + i % 9, 6, 7, 8, 9]} for i in range(32)]}),
        ok("sft/valid-huge-row-truncated", "sft", all_of(finished(), says(r"[1-9]\d* truncated", "the truncation")),
           files=row5("sft", {"prompt": "1=", "completion": LONG})),
        ok("sft/valid-prompt-fills-max-length", "sft", all_of(finished(), says(r"[1-9]\d* dropped", "the dropped row")),
           files=row5("sft", {"prompt": LONG, "completion": "12"}), config={"truncation_mode": "keep_start"}),
        bad("sft/row-longer-than-batch", "sft", ["data.jsonl", R5, "max_tokens_per_batch"],
            files=row5("sft", {"prompt": "1=", "completion": LONG}), config={"max_length": None}, **g),
        bad("sft/all-rows-dropped", "sft", [("dropped", "no row", "max_length", "no loss")],
            config={"max_length": 3, "truncation_mode": "keep_start"}, **g),
        bad("sft/batch-budget-below-every-row", "sft", ["max_tokens_per_batch"], config={"max_tokens_per_batch": 4}, **g),
    ]
    for algo in ("reward", "dpo"):
        pairs = [
            ("row-wrong-columns", {"data.jsonl": [{"prompt": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
                                                  for r in PAIRS]}, ["data.jsonl", "chosen"]),
            ("row-chosen-null", row5(algo, {"prompt": "1=", "chosen": None, "rejected": "2"}), ["data.jsonl", R5, "chosen"]),
            ("row-rejected-number", row5(algo, {"prompt": "1=", "chosen": "1", "rejected": 2}),
             ["data.jsonl", R5, "rejected"]),
            ("row-rejected-empty", row5(algo, {"prompt": "1=", "chosen": "1", "rejected": ""}),
             ["data.jsonl", R5, "rejected"]),
            ("row-prompt-null", row5(algo, {"prompt": None, "chosen": "1", "rejected": "2"}), ["data.jsonl", R5, "prompt"]),
            ("row-chosen-equals-rejected", row5(algo, {"prompt": "1=", "chosen": "1", "rejected": "1"}),
             ["data.jsonl", R5, "same"]),
            ("row-same-after-truncation", row5(algo, {"prompt": "1=", "chosen": LONG + "1", "rejected": LONG + "2"}),
             ["data.jsonl", R5, ("same", "max_length")]),
            ("chat-bad-role", {"data.jsonl": with_row(CHAT_PAIRS, 5, {"chosen": [{"role": "human", "content": "1"}],
                                                                      "rejected": CHAT_PAIRS[5]["rejected"]})},
             ["data.jsonl", R5, "human"]),
            ("chat-content-null", {"data.jsonl": with_row(CHAT_PAIRS, 5, {"chosen": [
                {"role": "user", "content": "1="}, {"role": "assistant", "content": None}],
                "rejected": CHAT_PAIRS[5]["rejected"]})}, ["data.jsonl", R5, "content"]),
        ]
        if algo == "reward":  # the same rows as DPO's; a few of them
            pairs = [p for p in pairs if p[0] in ("row-wrong-columns", "row-chosen-null", "row-chosen-equals-rejected")]
        out += [bad(f"{algo}/{n}", algo, m, files=f, config={"drop_bad_pairs": False}, **g) for n, f, m in pairs]
        out += [
            ok(f"{algo}/valid-bad-pair-dropped", algo, all_of(finished(), says(r"[1-9]\d* dropped", "the dropped pair")),
               files=row5(algo, {"prompt": "1=", "chosen": "1", "rejected": "1"}), config={"drop_bad_pairs": True}),
            bad(f"{algo}/all-pairs-dropped", algo, [("dropped", "no pair", "no row")],
                files={"data.jsonl": [{"prompt": "1=", "chosen": "1", "rejected": "1"}] * 16},
                config={"drop_bad_pairs": True}, **g),
            ok(f"{algo}/valid-implicit-prompt", algo, files={"data.jsonl": IMPLICIT}),
            ok(f"{algo}/valid-chat-pairs", algo, files={"data.jsonl": CHAT_PAIRS}),
            bad(f"{algo}/pair-longer-than-batch", algo, ["data.jsonl", R5, "max_tokens_per_batch"],
                files=row5(algo, {"prompt": "1=", "chosen": LONG, "rejected": LONG[:-5]}),
                config={"max_length": 8192, "max_prompt_length": 32}, **g),
        ]
    margins = [dict(r, margin=0.5) for r in PAIRS]
    out += [
        bad("reward/margin-nan", "reward", ["data.jsonl", R5, "margin"], files={"data.jsonl": with_row(
            margins, 5, json.dumps(dict(PAIRS[5], margin=math.nan)))}, **g),
        bad("reward/margin-infinity", "reward", ["data.jsonl", R5, "margin"], files={"data.jsonl": with_row(
            margins, 5, json.dumps(dict(PAIRS[5], margin=-math.inf)))}, **g),
        bad("reward/margin-text", "reward", ["data.jsonl", R5, "margin"],
            files={"data.jsonl": with_row(margins, 5, dict(PAIRS[5], margin="abc"))}, **g),
        bad("reward/margin-bool", "reward", ["data.jsonl", R5, "margin"],
            files={"data.jsonl": with_row(margins, 5, dict(PAIRS[5], margin=True))}, **g),
        bad("reward/margin-csv-nan", "reward", ["data.csv", R5, "margin"],
            files={"data.csv": csv_text(with_row(margins, 5, dict(PAIRS[5], margin="nan")), ["prompt", "chosen", "rejected",
                                                                                                "margin"])},
            config={"dataset_name": "data.csv"}, **g),
        ok("reward/valid-margin", "reward", files={"data.jsonl": margins}),
        ok("reward/valid-pretokenized", "reward", files={"data.jsonl": [
            {"input_ids_chosen": [5, 6, 7, 8], "attention_mask_chosen": [1, 1, 1, 1],
             "input_ids_rejected": [5, 6, 9, 10, 11], "attention_mask_rejected": [1, 1, 1, 1, 1]}] * 32}),
    ]
    ppo = [
        ("row-wrong-columns", {"data.jsonl": [{"text": r["query"]} for r in PROMPTS]}, ["data.jsonl", ("query", "prompt")]),
        ("row-query-null", row5("ppo", {"query": None}), ["data.jsonl", R5, "query"]),
        ("row-query-empty", row5("ppo", {"query": ""}), ["data.jsonl", R5, "query"]),
        ("row-query-number", row5("ppo", {"query": 12}), ["data.jsonl", R5, "query"]),
        ("prompt-too-long", row5("ppo", {"query": "7" * 10000 + "="}), ["data.jsonl", R5, ("length", "long", "tokens")]),
        ("ids-out-of-vocab", {"data.jsonl": with_row([{"input_ids": [5, 6, 7]}] * 32, 5, {"input_ids": [5, 99999]})},
         ["data.jsonl", R5, "input_ids"]),
        ("hh-row-without-assistant", {"data.jsonl": with_row([{"chosen": "\n\nHuman: 1=\n\nAssistant: 1"}] * 32, 5,
                                                             {"chosen": "\n\nHuman: hi"})}, ["data.jsonl", R5, "chosen"]),
        ("data-bad-utf8", {"data.jsonl": jsonl(PROMPTS).encode().replace(b'"469=', b'"4\xff69=')},
         ["data.jsonl", "utf-8"]),
    ]
    out += [bad(f"ppo/{n}", "ppo", m, files=f, **g) for n, f, m in ppo]
    out += [ok("ppo/valid-prompt-column", "ppo", files={"data.jsonl": [{"prompt": r["query"]} for r in PROMPTS]}),
            ok("ppo/valid-hh-rows", "ppo", files={"data.jsonl": [{"chosen": f"\n\nHuman: {r['query']}\n\nAssistant: 1"}
                                                                 for r in PROMPTS]})]
    return out


# (flag, value, the key the error must name) for every type of field; run against SFT.
TYPED = [
    ("max_steps", "abc"), ("max_steps", "2.5"), ("seed", "-1"), ("learning_rate", "abc"), ("learning_rate", "inf"),
    ("learning_rate", "nan"), ("max_grad_norm", "-1"), ("weight_decay", "-0.1"), ("adam_beta1", "1.5"),
    ("warmup_ratio", "2"), ("gradient_accumulation_steps", "0"), ("max_tokens_per_batch", "1"), ("save_steps", "-1"),
    ("save_total_limit", "0"), ("eval_steps", "0"), ("bf16", "maybe"), ("lr_scheduler_type", "cosin"), ("truncation_mode", "left"), ("dtype", "float33"),
    ("trust_remote_code", "nope"), ("report_to", "wandb"), ("max_length", "1"),
    ("neftune_noise_alpha", "-1"), ("resume_from_checkpoint", "5"), ("output_dir", "''"), ("deepspeed", "{stage: 7}"),
    ("deepspeed", "{stagee: 2}"), ("deepspeed", "[1, 2]"), ("deepspeed", "missing.json"), ("lora_dropout", "2"),
    ("dataset_train_split", "[1]"),
]
PER_ALGO = [
    ("dpo", "beta", "-0.1"), ("dpo", "loss_type", "sigmoidd"), ("dpo", "label_smoothing", "0.7"),
    ("dpo", "max_prompt_length", "0"), ("dpo", "discopop_tau", "0"), ("reward", "center_rewards_coefficient", "-1"),
    ("reward", "max_length", "1"), ("ppo", "cliprange", "0"), ("ppo", "gamma", "1.5"), ("ppo", "target", "0"),
    ("ppo", "kl_penalty", "kll"), ("ppo", "score_clip", "-1"), ("ppo", "steps", "0"),
    ("ppo", "num_shared_layers", "-1"), ("ppo", "num_shared_layers", "99"), ("ppo", "generation_kwargs", "[1, 2]"),
    ("ddpo", "num_epochs", "0"), ("ddpo", "mixed_precision", "fp8"),
    ("ddpo", "train_timestep_fraction", "1.5"), ("ddpo", "save_freq", "0"),
]


def config_cases() -> list[Case]:
    # What the error line must name: the key, or for a split its value (the line names the file and the split).
    named = {"dataset_train_split": "[1]"}
    out = [bad(f"sft/cfg-{key}={value}", "sft", [named.get(key, key)], args=[f"--{key}", value]) for key, value in TYPED]
    out += [bad(f"{algo}/cfg-{key}={value}", algo, [key], args=[f"--{key}", value]) for algo, key, value in PER_ALGO]
    out += [
        bad("sft/cfg-yaml-syntax", "sft", ["cfg.yaml"], config="model_name_or_path: [unclosed\nmax_steps: 2\n"),
        bad("sft/cfg-yaml-list", "sft", ["cfg.yaml"], config="- model_name_or_path\n- fastalign/tiny-llama\n"),
        bad("sft/cfg-yaml-tab", "sft", ["cfg.yaml"], config="model_name_or_path: fastalign/tiny-llama\n\tmax_steps: 2\n"),
        bad("sft/cfg-empty-file", "sft", ["model_name_or_path"], config=""),
        bad("sft/cfg-file-missing", "sft", ["nope.yaml"], args=["--config", "nope.yaml"], use_config=False),
        bad("sft/cfg-no-model", "sft", ["model_name_or_path"], config={"model_name_or_path": DELETE}),
        bad("dpo/cfg-no-dataset", "dpo", ["dataset_name"], config={"dataset_name": DELETE}),
        bad("sft/cfg-unknown-key", "sft", ["foo"], args=["--foo", "1"]),
        bad("sft/cfg-misspelled-flag", "sft", ["learnin_rate", "learning_rate"], args=["--learnin_rate", "1e-3"]),
        bad("sft/cfg-misspelled-in-file", "sft", ["max_step", "max_steps"], config={"max_step": 3}),
        bad("sft/cfg-dpo-key", "sft", ["beta"], args=["--beta", "0.1"]),
        bad("sft/cfg-ppo-run-key", "sft", ["reward_function"], args=["--reward_function", "sort_digits"]),
        bad("dpo/cfg-sft-key", "dpo", ["packing"], args=["--packing", "true"]),
        bad("ppo/cfg-dpo-key", "ppo", ["loss_type"], args=["--loss_type", "sigmoid"]),
        bad("sft/cfg-stray-word", "sft", ["extra"], args=["extra"]),
        bad("sft/cfg-output-dir-is-a-file", "sft", ["out"], files={"out": "a file"}),
        bad("sft/cfg-deepspeed-bad-json", "sft", ["ds.json"], files={"ds.json": "{stage: 2,"}, args=["--deepspeed", "ds.json"]),
        bad("dpo/cfg-prompt-longer-than-max", "dpo", ["max_prompt_length"], config={"max_prompt_length": 100}),
        bad("sft/cfg-lora-r-zero", "sft", ["lora_r"], args=["--use_peft", "true", "--lora_r", "0"]),
        bad("sft/cfg-lora-unknown-module", "sft", ["nonexistent_proj"],
            args=["--use_peft", "true", "--lora_target_modules", "[nonexistent_proj]"]),
        bad("sft/cfg-resume-nowhere", "sft", ["nowhere"], args=["--resume_from_checkpoint", "nowhere/checkpoint-5"]),
        bad("sft/cfg-resume-true-empty", "sft", ["resume_from_checkpoint"], args=["--resume_from_checkpoint", "true"]),
        bad("sft/cfg-resume-a-file", "sft", ["notes.txt"], files={"notes.txt": "x"},
            args=["--resume_from_checkpoint", "notes.txt"]),
        bad("ppo/cfg-mini-batch-over-batch", "ppo", ["mini_batch_size"], args=["--mini_batch_size", "8"]),
        Case("ppo/cfg-batch-not-multiple", "ppo", ["--batch_size", "6", "--mini_batch_size", "4"], expect="any",
             mentions=("batch_size",), group="config"),
        bad("ppo/cfg-reward-unknown", "ppo", ["nonexistent"], args=["--reward_function", "nonexistent"]),
        bad("ppo/cfg-reward-missing-module", "ppo", ["mymod"], args=["--reward_function", "mymod:score"]),
        bad("ppo/cfg-no-reward", "ppo", [("reward_function", "reward_model")], config={"reward_function": DELETE}),
        bad("ppo/cfg-reward-model-missing", "ppo", ["nope/rm"], config={"reward_function": DELETE},
            args=["--reward_model_name_or_path", "nope/rm"]),
        bad("ppo/cfg-gen-negative-tokens", "ppo", ["max_new_tokens"], args=["--generation_kwargs", "{max_new_tokens: -1}"]),
        bad("ppo/cfg-gen-zero-tokens", "ppo", ["max_new_tokens"], args=["--generation_kwargs", "{max_new_tokens: 0}"]),
        bad("ppo/cfg-gen-unknown-option", "ppo", ["bogus_option"],
            args=["--generation_kwargs", "{max_new_tokens: 4, bogus_option: 1}"]),
        bad("ppo/cfg-reward-fn-raises", "ppo", ["ZeroDivisionError"], files={"myreward.py": "def score(q, r):\n    1 / 0\n"},
            args=["--reward_function", "myreward:score"], expect="runtime", early=False),
        bad("ppo/cfg-reward-fn-nan", "ppo", ["reward"], expect="error", early=False,
            files={"myreward.py": "def score(q, r):\n    return [float('nan')] * len(q)\n"},
            args=["--reward_function", "myreward:score"]),
        bad("ppo/cfg-reward-fn-wrong-count", "ppo", ["reward"], expect="error", early=False,
            files={"myreward.py": "def score(q, r):\n    return [1.0]\n"}, args=["--reward_function", "myreward:score"]),
        ok("ppo/valid-reward-fn-module", "ppo", files={"myreward.py": "def score(q, r):\n    return [len(x) / 10 for x in r]\n"},
           args=["--reward_function", "myreward:score"]),
        bad("ddpo/cfg-reward-unknown", "ddpo", ["nope_reward"], args=["--reward_function", "nope_reward"]),
        bad("ddpo/cfg-prompt-fn-unknown", "ddpo", ["nope_prompts"], args=["--prompt_function", "nope_prompts"]),
        bad("ddpo/cfg-resume-nowhere", "ddpo", ["nowhere"], args=["--resume_from", "nowhere/checkpoint_3"]),
        Case("ddpo/cfg-train-batch-over-samples", "ddpo", ["--train_batch_size", "4"], expect="any",
             mentions=("train_batch_size",), group="config",
             check=finished(None, "out/unet", "diffusion_pytorch_model.safetensors")),
        ok("ddpo/valid-baseline", "ddpo", check=finished(None, "out/unet", "diffusion_pytorch_model.safetensors")),
        Case("sft/cfg-duplicate-yaml-key", "sft", expect="any", mentions=("max_steps",), group="config",
             config="model_name_or_path: fastalign/tiny-llama\ndataset_name: data.jsonl\noutput_dir: out\nmax_steps: 2\n"
                    "max_tokens_per_batch: 256\nmax_steps: 3\n", check=finished(3)),
        ok("sft/valid-dashed-key", "sft", finished(3), args=["--max-steps", "3"]),
        ok("sft/valid-peft", "sft", finished(name="adapter_model.safetensors"), args=["--use_peft", "true"]),
        ok("sft/valid-tensorboard", "sft", args=["--report_to", "[tensorboard]"]),
        ok("dpo/valid-reference-free", "dpo", args=["--reference_free", "true"]),
        ok("dpo/valid-precompute-ref", "dpo", args=["--precompute_ref_log_probs", "true"]),
        ok("ppo/valid-score-scaling", "ppo", args=["--use_score_scaling", "true", "--use_score_norm", "true"]),
        ok("sft/valid-streaming", "sft", args=["--streaming", "true"]),
    ]
    out += [
        Case("sft/cli-no-algorithm", "sft", ["--max_steps", "2"], use_config=False, mentions=("sft",), group="config"),
        Case("sft/cli-misspelled-algorithm", "sftt", ["--config", "cfg.yaml"], use_config=False, mentions=("sftt",),
             group="config", files={"cfg.yaml": "max_steps: 2\n"}),
    ]
    out[-2].algo = ""  # ``fastalign train --max_steps 2``
    return out


def model_cases() -> list[Case]:
    g = {"group": "model"}
    return [
        bad("sft/model-misspelled-builtin", "sft", ["tiny-lama", "tiny-llama"], config={"model_name_or_path": "fastalign/tiny-lama"}, **g),
        bad("ppo/model-misspelled-builtin", "ppo", ["tiny-lama", "tiny-llama"], config={"model_name_or_path": "fastalign/tiny-lama"}, **g),
        bad("sft/model-missing-local", "sft", ["models/mine"], config={"model_name_or_path": "./models/mine"}, **g),
        bad("dpo/model-hub-offline", "dpo", ["gpt2"], config={"model_name_or_path": "gpt2"}, expect="error", **g),
        bad("reward/model-hub-offline", "reward", ["Qwen/Qwen2-0.5B"], config={"model_name_or_path": "Qwen/Qwen2-0.5B"},
            expect="error", **g),
        bad("sft/model-folder-not-a-model", "sft", ["mymodel"], files={"mymodel/readme.txt": "hi"},
            config={"model_name_or_path": "mymodel"}, **g),
        bad("sft/model-folder-bad-config", "sft", ["mymodel", "config.json"], files={"mymodel/config.json": "{not json"},
            config={"model_name_or_path": "mymodel"}, **g),
        bad("sft/tokenizer-missing", "sft", ["nope/tok"], args=["--tokenizer_name_or_path", "nope/tok"], **g),
        bad("dpo/ref-model-missing", "dpo", ["nope/ref"], args=["--ref_model_name_or_path", "./nope/ref"], **g),
        Case("sft/model-float16", "sft", ["--dtype", "float16"], expect="any", mentions=("float16",), group="model"),
        Case("dpo/model-float16", "dpo", ["--dtype", "float16"], expect="any", mentions=("float16",), group="model"),
        Case("sft/model-bfloat16", "sft", ["--dtype", "bfloat16"], expect="any", mentions=("bfloat16",), group="model"),
        ok("sft/valid-tiny-qwen2", "sft", config={"model_name_or_path": "fastalign/tiny-qwen2"}),
    ]


def checkpoints_are(*names):
    def check(run):
        found = sorted(p.name for p in (run.dir / "out").glob("checkpoint-*"))
        return None if found == sorted(names) else f"checkpoints {found}, not {sorted(names)}"
    return check


def logged_steps(*steps):
    def check(run):
        found = [r["step"] for r in run.metrics() if "loss" in r]
        return None if found == list(steps) else f"losses logged at steps {found}, not {list(steps)}"
    return check


def epochs_run(epochs: float):
    def check(run):
        last = [r["epoch"] for r in run.metrics() if "epoch" in r][-1:]
        return None if last and abs(last[0] - epochs) < 1e-9 else f"ended at epoch {last}, not {epochs}"
    return check


def honoured_cases() -> list[Case]:
    """Values that must not be ignored, and the mistakes of ignoring one."""
    g = {"group": "config"}
    return [
        ok("sft/honoured-save-total-limit", "sft", all_of(finished(3), checkpoints_are("checkpoint-3")),
           args=["--max_steps", "3", "--save_steps", "1", "--save_total_limit", "1"]),
        ok("sft/honoured-logging-steps", "sft", all_of(finished(4), logged_steps(2, 4)),
           args=["--max_steps", "4", "--logging_steps", "2"]),
        ok("sft/honoured-max-length", "sft", all_of(finished(), says(r"[1-9]\d* truncated", "the truncation")),
           args=["--max_length", "8"]),
        ok("sft/honoured-epochs", "sft", all_of(finished(None), epochs_run(2.0)),
           config={"max_steps": DELETE, "num_train_epochs": 2}),
        bad("sft/cfg-dataset-config-on-file", "sft", ["dataset_config"], args=["--dataset_config", "foo"], **g),
        bad("sft/cfg-dataset-config-on-folder", "sft", ["dataset_config"], files={"datadir/train.jsonl": SFT},
            config={"dataset_name": "datadir", "dataset_config": "foo"}, **g),
        bad("sft/cfg-eval-steps-without-split", "sft", ["eval_steps"], args=["--eval_steps", "1"], **g),
        bad("sft/data-folder-of-other-files", "sft", ["datadir"], files={"datadir/a.jsonl": SFT,
                                                                         "datadir/b.jsonl": PAIRS},
            config={"dataset_name": "datadir"}, group="data"),
    ]


def other_vocabulary(path) -> None:
    """A model folder whose vocabulary is not the built-in tokenizer's (120 tokens, no tokenizer)."""
    from fastalign.models.tiny import tiny_model

    tiny_model("llama", vocab_size=120, hidden_size=32, layers=1, heads=2).save_pretrained(path)


def habit_cases() -> list[Case]:
    """Habits from other tools and settings that cannot do what they seem to."""
    g = {"group": "config"}
    long_row = {"prompt": "Say it long: ", "completion": "ab" * 200}  # past the tiny model's 256 positions
    return [
        bad("sft/cli-bare-output-dir", "sft", ["--output_dir"], args=["--output_dir"], **g),
        bad("sft/cli-bare-max-steps", "sft", ["--max_steps"], args=["--max_steps"], **g),
        bad("sft/cfg-seed=2**32", "sft", ["seed"], args=["--seed", str(2**32)], **g),
        bad("sft/cfg-per-device-batch-size", "sft", ["per_device_train_batch_size", "max_tokens_per_batch"],
            config={"per_device_train_batch_size": 4}, **g),
        bad("sft/cfg-fp16", "sft", ["fp16", "bf16"], config={"fp16": True}, **g),
        ok("sft/warmup-longer-than-run", "sft", all_of(finished(), says("warning: warmup_steps=50", "the warmup "
                                                                        "outlasts the run")),
           args=["--warmup_steps", "50"]),
        ok("sft/learning-rate-zero", "sft", all_of(finished(), says("warning: learning_rate is 0", "nothing will "
                                                                    "train")),
           args=["--learning_rate", "0"]),
        ok("sft/row-past-positions", "sft", all_of(finished(), says("warning: .*row 5 has a sequence of",
                                                                    "the row past the model's positions")),
           files=row5("sft", long_row), config={"max_length": None, "max_tokens_per_batch": 1024}),
        bad("ppo/cfg-batch-over-prompts", "ppo", ["batch_size", "3 prompts"], files={"data.jsonl": PROMPTS[:3]},
            args=["--batch_size", "8"]),
        bad("ppo/cfg-reward-module-syntax-error", "ppo", ["reward_function", "brokenreward"],
            files={"brokenreward.py": "def score(queries, responses:\n    return [0.0] * len(queries)\n"},
            config={"reward_function": "brokenreward:score"}),
        bad("dpo/ref-other-vocabulary", "dpo", ["ref_model_name_or_path", "tokenizer"],
            files={"refmodel": other_vocabulary}, config={"ref_model_name_or_path": "refmodel"}),
    ]


def cases() -> list[Case]:
    return data_cases() + row_cases() + config_cases() + model_cases() + honoured_cases() + habit_cases()
