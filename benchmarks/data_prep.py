"""Data preparation to the first optimizer step: fastalign, TRL and the tokenizer floor.

    python -m benchmarks.data_prep [--rows 10000,100000] [--workloads sft,dpo]
                                   [--systems floor,fastalign,trl] [--num-proc 2] [--work DIR]

The workload is made once in the work folder (default ``benchmarks/out/data_prep``) and reused:

- synthetic HH-RLHF-like rows from a deterministic vocabulary of pseudo-words (Zipf-distributed,
  short words common), seed 0, written streaming as JSONL. ``sft-ROWS.jsonl``: a ``text`` column,
  one "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue of ~160 tokens per row. ``dpo-ROWS.jsonl``:
  ``prompt`` (~110 tokens, two human turns), ``chosen`` and ``rejected`` (~50 tokens each);
- a byte-level BPE of 32,000 ids trained with ``tokenizers`` on 20k rows drawn like the SFT rows
  (``benchmarks/test_bench_hh_rlhf.train_bpe``), saved as a ``PreTrainedTokenizerFast``;
- a tiny random Llama (vocab 32000, hidden 64, 2 layers, 4 heads, intermediate 128), seed 0.

Each measurement runs in a fresh child process (this module, ``_child`` subcommand), one at a time,
with ``OMP_WAIT_POLICY=PASSIVE``, ``TOKENIZERS_PARALLELISM`` unset and the hub offline:

- ``floor``: the fast tokenizer's own batched encoding, ``tokenizer(texts)["input_ids"]`` over
  batches of 1000 texts (SFT: ``text``; DPO: prompt+chosen and prompt+rejected). Its seconds are
  the sum over the tokenizer calls only: no interpreter start, imports, file reading or JSON
  parsing. Its token count is the data set's size in tokens for every bytes-per-token figure.
- ``fastalign``: ``SFTTrainer``/``DPOTrainer`` given the JSONL path, the loaded tiny model and the
  tokenizer, ``max_steps=1`` (``dataset_num_proc`` from ``--num-proc`` when the config has it).
- ``trl``: TRL's ``SFTTrainer``/``DPOTrainer`` in the peer venv (``make bench-peers`` builds it;
  it has TRL and no fastalign) on ``datasets.load_dataset("json", ...)``, ``dataset_num_proc=2``,
  8 rows per device, ``max_steps=1``, on the CPU.

Trainers run twice: ``first`` with an empty ``HF_DATASETS_CACHE`` of their own, ``cached`` reusing
it. Time to first step: from the top of the child's module (before fastalign, torch or TRL are
imported) to the return of ``trainer.train()`` (one optimizer step); import, model-load, trainer
construction (the data preparation) and train seconds are recorded apart. Peak RSS growth: the
child's ``ru_maxrss`` at the end minus its RSS once model and tokenizer are loaded (before the
trainer is made); per token, divided by the floor's token count. Worker processes (``datasets.map``)
are not in that figure; their largest peak is recorded as ``children_peak_rss``.

Writes ``results.jsonl`` (one record per child, appended) and ``results.md`` (the latest record of
each kind, with fastalign's data-path targets as pass/fail) in the work folder.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # a child's start of work: nothing heavy is imported above this line

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.peers.report import peak_rss_bytes, rss_bytes  # noqa: E402  (plain Python: safe in the peer venv)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = ROOT / "benchmarks" / "out" / "data_prep"
PEERS_PY = ROOT / "benchmarks" / "out" / "venv-peers" / "bin" / "python"
SEED = 0
VOCAB = 32000
TOKENIZER_SAMPLE = 20000
FLOOR_BATCH = 1000
MAX_LENGTH = {"sft": 1024, "dpo": 512}
MAX_PROMPT_LENGTH = 128
TRL_BATCH = 8
GIB = 1024 ** 3
# fastalign's data-path targets.
FLOOR_RATIO = 1.5
CACHED_SECONDS, CACHED_AT_ROWS = 15.0, 100_000
BYTES_PER_TOKEN = 4.0
PEAK_GIB, PEAK_AT_ROWS = 4.0, 1_000_000


def log(message: str) -> None:
    print(f"[data_prep {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ---- the workload ------------------------------------------------------------------------------

ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z",
          "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sh", "sl", "sp", "st", "str",
          "th", "tr", "wh")
NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oa", "oo", "ou", "y")
CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rd", "rt", "st", "ck", "sh", "th", "ll", "ss")


class Prose:
    """English-like text from 50,000 pseudo-words, the short ones common (Zipf over length order);
    ~1.3 tokens per word under the benchmark's BPE. Deterministic from the seed."""

    def __init__(self, seed: int = SEED, words: int = 50_000):
        self.rng = random.Random(seed)
        vocabulary: dict[str, None] = {}
        while len(vocabulary) < words:
            syllables = self.rng.choices((1, 2, 3, 4), weights=(45, 35, 15, 5))[0]
            vocabulary["".join(self.rng.choice(ONSETS) + self.rng.choice(NUCLEI) + self.rng.choice(CODAS)
                               for _ in range(syllables))] = None
        self.words = sorted(vocabulary, key=len)
        self.cum_weights = list(itertools.accumulate(1.0 / rank for rank in range(1, words + 1)))

    def turn(self, low: int, high: int) -> str:
        """Sentences of low..high words in all."""
        left, sentences = self.rng.randint(low, high), []
        while left > 0:
            n = min(left, self.rng.randint(5, 18))
            left -= n
            words = self.rng.choices(self.words, cum_weights=self.cum_weights, k=n)
            sentences.append(words[0].capitalize() + " " + " ".join(words[1:]) + self.rng.choice(".....?!"))
        return " ".join(sentences)

    def sft(self) -> dict:
        return {"text": f"\n\nHuman: {self.turn(18, 44)}\n\nAssistant: {self.turn(45, 112)}"}

    def dpo(self) -> dict:
        prompt = (f"\n\nHuman: {self.turn(10, 36)}\n\nAssistant: {self.turn(18, 46)}"
                  f"\n\nHuman: {self.turn(5, 22)}\n\nAssistant:")
        return {"prompt": prompt, "chosen": " " + self.turn(25, 50), "rejected": " " + self.turn(25, 50)}


def write_rows(path: Path, workload: str, rows: int) -> None:
    """``rows`` rows of ``workload``, streamed to ``path`` (via a temporary file: a killed write
    leaves nothing that looks finished)."""
    prose = Prose()
    make = getattr(prose, workload)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(rows):
            f.write(json.dumps(make()) + "\n")
    tmp.rename(path)


def data_path(work: Path, workload: str, rows: int) -> Path:
    return work / "data" / f"{workload}-{rows}.jsonl"


def ensure_data(work: Path, workload: str, rows: int) -> Path:
    path = data_path(work, workload, rows)
    if not path.exists():
        log(f"writing {path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        write_rows(path, workload, rows)
        log(f"wrote {path.name}: {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - began:.0f} s")
    return path


def ensure_tokenizer(work: Path) -> Path:
    """The 32k byte-level BPE, trained on SFT-like rows of a seed of its own, as ``save_pretrained``."""
    out = work / "tokenizer"
    if not (out / "tokenizer.json").exists():
        from benchmarks.test_bench_hh_rlhf import load_tokenizer, train_bpe

        log(f"training a {VOCAB}-id BPE on {TOKENIZER_SAMPLE} rows")
        prose = Prose(seed=SEED + 1)
        texts = (prose.sft()["text"] for _ in range(TOKENIZER_SAMPLE))
        raw = work / "bpe.json"
        train_bpe(({"chosen": a, "rejected": b} for a, b in zip(texts, texts)), raw, VOCAB)  # consecutive rows
        load_tokenizer(raw).save_pretrained(out)
    return out


def ensure_model(work: Path) -> Path:
    out = work / "model"
    if not (out / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(SEED)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=128, max_position_embeddings=2048,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
        LlamaForCausalLM(config).save_pretrained(out)
    return out


# ---- the children ------------------------------------------------------------------------------

TEXTS_PER_ROW = {"sft": 1, "dpo": 2}


def texts_of(row: dict, workload: str) -> list[str]:
    """What must be tokenized for one row."""
    if workload == "sft":
        return [row["text"]]
    return [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]


def versions(system: str) -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "datasets", "tokenizers")
            + (("trl",) if system == "trl" else ())}


def run_floor(spec: dict) -> dict:
    from transformers import AutoTokenizer

    workload = spec["workload"]
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    seconds, tokens, texts = 0.0, 0, 0
    cpu = time.process_time()
    with open(spec["data"]) as f:
        while batch := [text for line in itertools.islice(f, FLOOR_BATCH // TEXTS_PER_ROW[workload])
                        for text in texts_of(json.loads(line), workload)]:
            began = time.perf_counter()
            ids = tokenizer(batch)["input_ids"]
            seconds += time.perf_counter() - began
            tokens += sum(map(len, ids))
            texts += len(batch)
    return {"seconds": seconds, "tokens": tokens, "texts": texts, "cpu_seconds": time.process_time() - cpu,
            "wall_from_start": time.perf_counter() - T0, "versions": versions("floor")}


def config_of(cls, wanted: dict, optional: dict) -> tuple[object, dict]:
    """``cls(**wanted, **the optional fields cls has)`` and which optional ones it took."""
    names = {f.name for f in dataclasses.fields(cls)}
    taken = {k: v for k, v in optional.items() if k in names}
    return cls(**wanted, **taken), {k: k in taken for k in optional}


def fastalign_trainer(spec: dict, model, tokenizer):
    from fastalign.algorithms.dpo import DPOConfig, DPOTrainer
    from fastalign.algorithms.sft import SFTConfig, SFTTrainer

    common = dict(output_dir=spec["output_dir"], max_steps=1, disable_tqdm=True, max_length=spec["max_length"])
    optional = {"dataset_num_proc": spec["num_proc"]}
    if spec["workload"] == "sft":
        args, took = config_of(SFTConfig, common, optional)
        return SFTTrainer(model, args=args, train_dataset=spec["data"], tokenizer=tokenizer), took
    args, took = config_of(DPOConfig, dict(common, max_prompt_length=MAX_PROMPT_LENGTH), optional)
    return DPOTrainer(model, args=args, train_dataset=spec["data"], tokenizer=tokenizer), took


def trl_trainer(spec: dict, model, tokenizer):
    import datasets
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    dataset = datasets.load_dataset("json", data_files=spec["data"], split="train")
    common = dict(output_dir=spec["output_dir"], max_steps=1, disable_tqdm=True, max_length=spec["max_length"],
                  dataset_num_proc=spec["num_proc"], per_device_train_batch_size=TRL_BATCH, report_to=[],
                  use_cpu=True, save_strategy="no", logging_steps=1)
    if spec["workload"] == "sft":
        args, took = config_of(SFTConfig, common, {})
        return SFTTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer), took
    args, took = config_of(DPOConfig, common, {"max_prompt_length": MAX_PROMPT_LENGTH})  # gone in TRL 1.x
    return DPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer), took


def run_trainer(spec: dict) -> dict:
    build = {"fastalign": fastalign_trainer, "trl": trl_trainer}[spec["system"]]
    if spec["system"] == "fastalign":
        import fastalign.algorithms.dpo  # noqa: F401
        import fastalign.algorithms.sft  # noqa: F401
    else:  # trl imports lazily: its trainers now, so that the import is timed as fastalign's is
        import datasets  # noqa: F401
        from trl import DPOTrainer, SFTTrainer  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    loaded, loaded_rss = time.perf_counter(), rss_bytes()
    trainer, options = build(spec, model, tokenizer)
    built, built_rss, built_peak_rss = time.perf_counter(), rss_bytes(), peak_rss_bytes()
    trainer.train()
    done = time.perf_counter()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "seconds": done - T0, "import_seconds": imported - T0, "load_seconds": loaded - imported,
        "prepare_seconds": built - loaded, "train_seconds": done - built,
        "loaded_rss": loaded_rss, "built_rss": built_rss, "built_peak_rss": built_peak_rss,
        "peak_rss": peak_rss_bytes(),
        "end_rss": rss_bytes(), "children_peak_rss": children.ru_maxrss * 1024,
        "cpu_seconds": time.process_time(), "children_cpu_seconds": children.ru_utime + children.ru_stime,
        "global_step": getattr(getattr(trainer, "state", trainer), "global_step", None),  # TRL's / fastalign's
        "optional_options": options,
        "versions": versions(spec["system"]),
    }


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = (run_floor if spec["system"] == "floor" else run_trainer)(spec)
    Path(spec["result"]).write_text(json.dumps(result))


# ---- the parent --------------------------------------------------------------------------------

def child_env(cache: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "HF_DATASETS_CACHE")}
    env.update(OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if cache is not None:
        env["HF_DATASETS_CACHE"] = str(cache)
    return env


def run_child(python: str, spec: dict, env: dict, log_path: Path, timeout: float) -> tuple[str, dict, float]:
    """Runs one child to its end or ``timeout`` (its whole process group is killed then):
    ``(status, result, wall seconds including the interpreter's start)``."""
    spec_path = log_path.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    began = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen([python, "-m", "benchmarks.data_prep", "_child", str(spec_path)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    wall = time.perf_counter() - began
    result_path = Path(spec["result"])
    if code == 0 and result_path.exists():
        return "ok", json.loads(result_path.read_text()), wall
    return ("timeout" if code is None else f"failed (exit {code})"), {}, wall


def git_state() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "fastalign")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in fastalign/" if dirty else "")


def measure(opts, paths: dict, workload: str, rows: int, system: str, phase: str) -> dict:
    """One child run of ``system`` on (``workload``, ``rows``), appended to results.jsonl."""
    work = opts.work
    name = f"{system}-{workload}-{rows}"
    cache = None if system == "floor" else work / "cache" / name
    if phase == "first" and cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    output_dir = work / "runs" / name
    shutil.rmtree(output_dir, ignore_errors=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    spec = {"system": system, "workload": workload, "data": str(paths["data"]), "tokenizer": str(paths["tokenizer"]),
            "model": str(paths["model"]), "output_dir": str(output_dir), "max_length": MAX_LENGTH[workload],
            "num_proc": opts.num_proc, "result": str(work / "logs" / f"{name}-{phase}.result.json")}
    python = str(PEERS_PY) if system == "trl" else sys.executable
    load_before = os.getloadavg()
    status, result, wall = run_child(python, spec, child_env(cache), work / "logs" / f"{name}-{phase}.log",
                                     opts.timeout)
    record = {"workload": workload, "rows": rows, "system": system, "phase": phase, "status": status,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_with_start": wall,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "num_proc": opts.num_proc,
              "tokenizers_parallelism": "unset", "omp_wait_policy": "PASSIVE", "python": python,
              "data_bytes": paths["data"].stat().st_size, **result}
    if system == "fastalign":
        record["fastalign_git"] = git_state()
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log(f"{name} {phase}: {summary(record)}")
    return record


def summary(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']} after {record['wall_with_start']:.0f} s (see logs/)"
    if record["system"] == "floor":
        return f"{record['tokens']:,} tokens, {record['seconds']:.1f} s in the tokenizer"
    return (f"{record['seconds']:.1f} s to first step (import {record['import_seconds']:.1f}, "
            f"prepare {record['prepare_seconds']:.1f}), peak RSS {record['peak_rss'] / GIB:.2f} GiB")


def latest(work: Path) -> dict:
    """The latest record of each (workload, rows, system, phase) in results.jsonl."""
    out = {}
    path = work / "results.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out[(r["workload"], r["rows"], r["system"], r["phase"])] = r
    return out


def run_workload(opts, paths: dict, workload: str, rows: int) -> None:
    systems = list(opts.systems)
    if "floor" not in systems and (workload, rows, "floor", "run") not in latest(opts.work):
        systems.insert(0, "floor")  # its token count is what bytes per token divide by
        log(f"{workload} {rows}: no token count recorded yet, running the floor first")
    for system in systems:
        if system == "floor":
            measure(opts, paths, workload, rows, system, "run")
            continue
        if system == "trl" and rows > opts.trl_max_rows:
            log(f"trl-{workload}-{rows}: skipped (--trl-max-rows {opts.trl_max_rows})")
            continue
        if system == "trl" and not PEERS_PY.exists():
            log("trl: skipped, no peer venv (make benchmarks/out/venv-peers/.peers-installed)")
            continue
        for phase in ("first", "cached"):
            measure(opts, paths, workload, rows, system, phase)


# ---- the report --------------------------------------------------------------------------------

def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "FAIL")


def ok(record: dict | None) -> bool:
    return bool(record) and record["status"] == "ok"


def seconds_cell(record: dict | None, floor: float | None) -> str:
    if record and not ok(record):
        return record["status"].split(" ")[0]  # "failed" or "timeout"
    if not record:
        return "-"
    return fmt(record["seconds"]) + (f" ({record['seconds'] / floor:.1f}x)" if floor else "")


def per_token(record: dict | None, tokens: int | None, peak: str = "peak_rss") -> float | None:
    """Bytes of RSS growth over the loaded model and tokenizer, per token of the data set."""
    return (record[peak] - record["loaded_rss"]) / tokens if ok(record) and tokens else None


SYSTEM_COLUMNS = ("first s (x floor)", "cached s", "prepare s first / cached", "peak RSS GiB", "B/token first / cached",
                  "B/token by step 1")


def system_cells(first: dict | None, cached: dict | None, tokens: int | None, floor_s: float | None) -> list[str]:
    """The SYSTEM_COLUMNS of one trainer. Prepare: making the trainer (the data preparation, without
    imports, model load or the step). Peak RSS and "by step 1" (the peak once the trainer is made,
    before ``train()``: without the step's activations and optimizer state) of the first run."""
    return [seconds_cell(first, floor_s), seconds_cell(cached, None),
            " / ".join(fmt(r["prepare_seconds"] if ok(r) else None) for r in (first, cached)),
            fmt(first["peak_rss"] / GIB if ok(first) else None, ".2f"),
            " / ".join(fmt(per_token(r, tokens)) for r in (first, cached)),
            fmt(per_token(first, tokens, "built_peak_rss"))]


def checks(workload: str, rows: int, floor_s: float | None, first: dict | None, cached: dict | None,
           tokens: int | None) -> list[bool | None]:
    """fastalign's data-path targets; None where one does not apply or is not measured."""
    per_tokens = [b for b in (per_token(first, tokens), per_token(cached, tokens)) if b is not None]
    return [
        first["seconds"] <= FLOOR_RATIO * floor_s if ok(first) and floor_s else None,
        cached["seconds"] <= CACHED_SECONDS if ok(cached) and rows <= CACHED_AT_ROWS else None,
        max(per_tokens) <= BYTES_PER_TOKEN if per_tokens else None,
        first["peak_rss"] <= PEAK_GIB * GIB if ok(first) and workload == "sft" and rows >= PEAK_AT_ROWS else None,
    ]


CHECK_COLUMNS = (f"first <= {FLOOR_RATIO}x floor", f"cached <= {CACHED_SECONDS:.0f} s (<= {CACHED_AT_ROWS:,} rows)",
                 f"<= {BYTES_PER_TOKEN:.0f} B/token", f"SFT {PEAK_AT_ROWS:,}: peak <= {PEAK_GIB:.0f} GiB")
HEADER = ["rows", "tokens", "floor s", *(f"fastalign {c}" for c in SYSTEM_COLUMNS), *CHECK_COLUMNS,
          *(f"TRL {c}" for c in SYSTEM_COLUMNS)]


def table_row(records: dict, workload: str, rows: int) -> list[str]:
    def get(system, phase):
        return records.get((workload, rows, system, phase))

    floor = get("floor", "run")
    tokens, floor_s = (floor["tokens"], floor["seconds"]) if ok(floor) else (None, None)
    fastalign, trl = (get(system, "first") for system in ("fastalign", "trl"))
    fastalign_cached, trl_cached = (get(system, "cached") for system in ("fastalign", "trl"))
    return [f"{rows:,}", fmt(tokens, ","), fmt(floor_s), *system_cells(fastalign, fastalign_cached, tokens, floor_s),
            *map(verdict, checks(workload, rows, floor_s, fastalign, fastalign_cached, tokens)),
            *system_cells(trl, trl_cached, tokens, floor_s)]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows]]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


NOTES = [
    "Seconds: floor = the tokenizer calls only (no start, imports or file reading); trainers = child start "
    "(before any import) to the end of `trainer.train()` (one optimizer step), prepare = making the trainer. "
    "(x floor): over the floor's seconds.",
    "B/token = (peak RSS - RSS with model and tokenizer loaded) / the floor's tokens; \"by step 1\" takes the peak "
    "once the trainer is made, before `train()`. At small sizes the step's own fixed memory (optimizer state, "
    "activations, logits) dominates the first figure.",
    "A failed or timed-out run shows its status; logs/ in the work folder has its output.",
]


def write_report(work: Path) -> Path:
    """results.md from the latest record of each run in results.jsonl."""
    by_run = latest(work)
    records = by_run.values()
    dates = sorted(r["date"] for r in records) or ["-"]
    loads = sorted(load[0] for r in records for load in (r["loadavg_before"], r["loadavg_after"])) or [0.0]
    lines = ["# Data preparation to the first step (benchmarks/data_prep.py)", "",
             f"Machine: {machine()}. Runs from {dates[0]} to {dates[-1]} (UTC); 1-minute load average "
             f"{loads[0]:.2f} to {loads[-1]:.2f} around them (each record in results.jsonl has its own).", "",
             *NOTES, ""]
    for workload in ("sft", "dpo"):
        sizes = sorted({r["rows"] for r in records if r["workload"] == workload})
        if sizes:
            lines += [f"## {workload.upper()}", "",
                      *markdown_table(HEADER, [table_row(by_run, workload, rows) for rows in sizes]), ""]
    lines += ["## Versions", "", *sorted({f"- {r['system']}: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
                                          + (f"; fastalign {r['fastalign_git']}" if "fastalign_git" in r else "")
                                          for r in records if "versions" in r})]
    out = work / "results.md"
    out.write_text("\n".join(lines) + "\n")
    return out


# ---- the command line --------------------------------------------------------------------------

def parse(argv: list[str]):
    csv = lambda kind: lambda s: [kind(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_prep", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=csv(int), default=[10_000, 100_000, 1_000_000])
    p.add_argument("--workloads", type=csv(str), default=["sft", "dpo"])
    p.add_argument("--systems", type=csv(str), default=["floor", "fastalign", "trl"])
    p.add_argument("--num-proc", type=int, default=2, help="tokenizing processes (fastalign when its config has "
                                                           "dataset_num_proc; TRL's dataset_num_proc)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--trl-max-rows", type=int, default=100_000)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child run")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md from results.jsonl, run nothing")
    opts = p.parse_args(argv)
    for name, allowed in (("workloads", {"sft", "dpo"}), ("systems", {"floor", "fastalign", "trl"})):
        if not set(getattr(opts, name)) <= allowed:
            p.error(f"--{name}: expected some of {sorted(allowed)}")
    opts.work = opts.work.resolve()
    return opts


def main(argv: list[str]) -> None:
    if argv[:1] == ["_child"]:
        return child(argv[1])
    opts = parse(argv)
    opts.work.mkdir(parents=True, exist_ok=True)
    if not opts.report_only:
        shared = {"tokenizer": ensure_tokenizer(opts.work), "model": ensure_model(opts.work)}
        for workload in opts.workloads:
            for rows in opts.rows:
                run_workload(opts, dict(shared, data=ensure_data(opts.work, workload, rows)), workload, rows)
    report = write_report(opts.work)
    log(f"wrote {report}")


if __name__ == "__main__":
    main(sys.argv[1:])
