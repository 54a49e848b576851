"""DPO and reward-model training on real HH-RLHF pairs: tokens/s, peak memory, pad tokens avoided.

Data: the 2,312 pairs of ``../shared/data/hh-rlhf-harmless-base-test.jsonl.gz`` (beside the repo;
the benchmark skips when it is absent), implicit-prompt format. Tokenizer: a byte-level BPE of 4,096
ids trained here on those same texts with the ``tokenizers`` library (a few seconds, nothing
downloaded; the built-in character tokenizer would make every sequence about 3.7 times longer).
Model: a tiny random Llama (hidden 128, 2 layers, 4 heads). Data options as TRL's defaults for
DPO: max_length 512, max_prompt_length 128, truncation keep_end, pairs packed into micro-batches of
at most 4,096 tokens; ``drop_bad_pairs`` (the number dropped is reported).

Each trainer runs in a fresh process (``python -m benchmarks.test_bench_hh_rlhf ALGO TOKENIZER
RUN_DIR``), so its peak memory is its own. The process loads the data, builds the trainer, says
``ready`` and waits; pytest-benchmark times from the go signal to the end of ``trainer.train()``
(STEPS optimizer steps, one micro-batch each, and the final save). Figures per trainer:

- real tokens/s and seconds per step: from the run's ``metrics.jsonl``, over the steps after the
  first (a warm-up); real tokens are ``num_tokens x (1 - padding_fraction)``, all of them here;
- peak memory: on the CPU the process's resident-set high-water mark (``getrusage``), and how
  much of it came on top of the built trainer (data, model, reference copy, packed batches); on a
  GPU ``torch.cuda.max_memory_allocated`` and the part above what was allocated before training;
- CPU seconds per step: the process's CPU time over ``train()`` (every step, the warm-up and the
  final save included) over the steps: near threads x s/step when the process has the cores to
  itself, less on a busy shared machine (it got about one of 2 cores in the 2026-11-21 runs);
- pad tokens avoided: over every micro-batch of the packed epoch, the pad tokens the same pairs
  would carry padded as TRL 0.7.10 pads them, over that padded total (the packed batches carry
  none). DPO's concatenated forward pads the 2B sequences of B pairs to the longest one (2B x
  longest); the reward collator pads chosen and rejected separately (B x longest chosen + B x
  longest rejected). Also given: the same for TRL's own batching, the pairs in random order in
  batches of as many pairs as a packed micro-batch holds on average.

The table goes to benchmarks/out/hh_rlhf.md (and stdout). ``FASTALIGN_BENCH_QUICK=1``: 3 steps.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
import torch

from benchmarks.peers.report import peak_rss_bytes, rss_bytes
from benchmarks.peers.workload import DATA, SHARED
from fastalign.engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "out"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

VOCAB = 4096
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
MODEL = dict(hidden_size=128, layers=2, heads=4, max_positions=512)
DATA_OPTIONS = dict(max_tokens_per_batch=4096, max_length=512, max_prompt_length=128, truncation_mode="keep_end",
                    drop_bad_pairs=True)
STEPS = 3 if os.environ.get("FASTALIGN_BENCH_QUICK") == "1" else 6  # the first is a warm-up
LEARNING_RATES = {"dpo": 1e-4, "reward": 1e-4}
ALGOS = ["dpo", "reward"]
RESULTS: dict[str, dict] = {}


def _missing() -> str | None:
    if not SHARED.is_dir():
        return f"{SHARED} is absent: the HH-RLHF benchmark reads its pairs from the shared data folder beside the repo"
    if not DATA.is_file():
        return f"{DATA} is absent: the HH-RLHF benchmark needs that file"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


# ---- data and tokenizer ------------------------------------------------------------------------
def train_bpe(rows, path: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE of ``vocab_size`` ids on the chosen and rejected texts, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator((text for row in rows for text in (row["chosen"], row["rejected"])), trainer)
    core.save(str(path))


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)), pad_token="<pad>",
                                   bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def pair_lengths(batches) -> list[list[tuple[int, int]]]:
    """Per micro-batch, the (chosen, rejected) token counts of its pairs."""
    out = []
    for b in batches:
        lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        out.append([(lengths[c], lengths[r]) for c, r in zip(b.chosen.tolist(), b.rejected.tolist())])
    return out


def padded_tokens(pairs: list[tuple[int, int]], algo: str) -> int:
    """Tokens of these pairs padded as TRL 0.7.10 pads one batch of them."""
    if algo == "dpo":  # concatenated_forward: chosen and rejected, all padded to the longest
        return 2 * len(pairs) * max(max(p) for p in pairs)
    return len(pairs) * (max(c for c, _ in pairs) + max(r for _, r in pairs))  # reward collator


def pad_shares(batches, algo: str, seed: int = 0) -> dict:
    groups = pair_lengths(batches)
    real = sum(c + r for g in groups for c, r in g)
    padded = sum(padded_tokens(g, algo) for g in groups)
    flat = [p for g in groups for p in g]
    per_batch = round(len(flat) / len(groups))
    random.Random(seed).shuffle(flat)
    shuffled = sum(padded_tokens(flat[i:i + per_batch], algo) for i in range(0, len(flat), per_batch))
    return {"micro_batches": len(groups), "pairs_per_batch": len(flat) / len(groups), "real_tokens": real,
            "pad_share": 1 - real / padded, "trl_batch_pairs": per_batch, "trl_random_pad_share": 1 - real / shuffled}


# ---- one trainer, in its own process ------------------------------------------------------------
def build_trainer(algo: str, tokenizer_path: Path, run_dir: Path):
    from fastalign.algorithms import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
    from fastalign.data import load_rows
    from fastalign.models.tiny import tiny_model

    rows = load_rows(str(DATA))
    tokenizer = load_tokenizer(tokenizer_path)
    model = tiny_model("llama", vocab_size=len(tokenizer), **MODEL)
    common = dict(output_dir=str(run_dir), learning_rate=LEARNING_RATES[algo], max_steps=STEPS, disable_tqdm=True,
                  logging_steps=1, seed=0, **DATA_OPTIONS)
    if algo == "dpo":
        return DPOTrainer(model, args=DPOConfig(beta=0.1, loss_type="sigmoid", **common), train_dataset=rows,
                          tokenizer=tokenizer)
    return RewardTrainer(model, args=RewardConfig(**common), train_dataset=rows, tokenizer=tokenizer)


def probe(algo: str, tokenizer_path: Path, run_dir: Path) -> None:
    """Build, say ready, wait for go, train, print the figures as one JSON line."""
    trainer = build_trainer(algo, tokenizer_path, run_dir)
    report = trainer.reports["train"]
    figures = {"algo": algo, "pairs": report.rows, "truncated": report.truncated, "dropped": report.dropped,
               **pad_shares(trainer.train_batches, algo)}
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    print("ready", flush=True)
    sys.stdin.readline()
    cpu = time.process_time()
    result = trainer.train()
    cpu = time.process_time() - cpu
    if DEVICE == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    steps = [r for r in read_metrics(run_dir) if "seconds_per_step" in r]
    timed = steps[1:] or steps  # the first step is a warm-up
    real = [r["num_tokens"] * (1 - r["padding_fraction"]) for r in timed]
    seconds = [r["seconds_per_step"] for r in timed]
    figures.update(
        steps=len(steps), timed_steps=len(timed), tokens_per_s=sum(real) / sum(seconds),
        seconds_per_step=statistics.mean(seconds), tokens_per_step=statistics.mean(real),
        tokens_trained=int(sum(r["num_tokens"] for r in steps)),
        padding_fraction_logged=max(r["padding_fraction"] for r in steps),
        peak_bytes=peak, peak_extra_bytes=max(0, peak - base), first_loss=steps[0]["loss"], last_loss=steps[-1]["loss"],
        train_runtime=result["train_runtime"], cpu_seconds_per_step=cpu / len(steps),
    )
    print(json.dumps(figures), flush=True)


# ---- the benchmark ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from fastalign.data import load_rows

    path = tmp_path_factory.mktemp("hh_rlhf") / "bpe.json"
    train_bpe(load_rows(str(DATA)), path)
    return path


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(results: dict) -> str:
    import transformers

    machine = torch.cuda.get_device_name() if DEVICE == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    memory = "max_memory_allocated" if DEVICE == "cuda" else "peak RSS"
    any_result = next(iter(results.values()))
    header = (f"{date.today()} · {machine} · torch {torch.__version__} · transformers {transformers.__version__} · "
              f"python {platform.python_version()}")
    setup = (f"HH-RLHF harmless-base test: {any_result['pairs']} pairs ({any_result['truncated']} truncated, "
             f"{any_result['dropped']} dropped), byte-level BPE V={VOCAB}, tiny Llama H={MODEL['hidden_size']} "
             f"L={MODEL['layers']}, max_length {DATA_OPTIONS['max_length']} / prompt "
             f"{DATA_OPTIONS['max_prompt_length']}, "
             f"micro-batches of <= {DATA_OPTIONS['max_tokens_per_batch']} tokens, {any_result['steps']} steps "
             "(the first left out of tokens/s and s/step).")
    columns = (f"| trainer | real tokens/s | s/step | CPU s/step | tokens/step | {memory} (extra over built trainer) | "
               "micro-batches (pairs each) | pad share, same batches padded | pad share, TRL random batches | "
               "pad tokens in packed batches |")
    rows = [header, "", setup, "", columns, "|---|---|---|---|---|---|---|---|---|---|"]
    for algo, r in results.items():
        rows.append(
            f"| {algo} | {r['tokens_per_s']:.0f} | {r['seconds_per_step']:.2f} | {r['cpu_seconds_per_step']:.2f} | "
            f"{r['tokens_per_step']:.0f} | {_gib(r['peak_bytes'])} ({_gib(r['peak_extra_bytes'])}) | "
            f"{r['micro_batches']} ({r['pairs_per_batch']:.1f}) | "
            f"**{r['pad_share']:.1%}** | {r['trl_random_pad_share']:.1%} (B={r['trl_batch_pairs']}) | "
            f"{r['padding_fraction_logged']:.0%} |"
        )
    return "\n".join(rows) + "\n"


def _read_until(proc, wanted) -> str:
    """The first line of the probe's stdout that is ``wanted`` (other output is passed on), or ""."""
    for line in proc.stdout:
        if wanted(line.strip()):
            return line.strip()
        print(line, end="")
    return ""


@pytest.mark.parametrize("algo", ALGOS)
def test_hh_rlhf_training(benchmark, algo, tokenizer_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    procs = []
    with open(tmp_path / "stderr.txt", "w+") as log:

        def start():
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.test_bench_hh_rlhf", algo, str(tokenizer_path), str(run_dir)],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            )
            procs.append(proc)
            if not _read_until(proc, lambda text: text == "ready"):
                proc.kill()
                log.seek(0)
                pytest.fail(f"the {algo} probe failed before training:\n{log.read()[-4000:]}")
            return (proc,), {}

        def train(proc):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            return _read_until(proc, lambda text: text.startswith("{"))

        try:
            benchmark.group = "hh-rlhf training"
            line = benchmark.pedantic(train, setup=start, rounds=1, iterations=1, warmup_rounds=0)
            code = procs[-1].wait(timeout=60)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        log.seek(0)
        assert code == 0 and line, f"the {algo} probe failed:\n{log.read()[-4000:]}"
    figures = json.loads(line)
    benchmark.extra_info.update(
        # The keys the kernel table of `python -m benchmarks` reads: n = tokens trained.
        op=f"train {algo} (hh-rlhf)", n=figures["tokens_trained"], h=MODEL["hidden_size"], v=VOCAB, dtype="fp32",
        path="fastalign packed", device=DEVICE, **{k: v for k, v in figures.items() if k not in ("algo",)},
    )
    assert figures["padding_fraction_logged"] == 0.0 and 0 < figures["pad_share"] < 1
    RESULTS[algo] = figures
    text = table(RESULTS)
    OUT.mkdir(exist_ok=True)
    (OUT / "hh_rlhf.md").write_text(text)
    with capsys.disabled():
        print("\n" + text)


if __name__ == "__main__":
    probe(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
