"""GRPO end to end: fastalign's ``GRPOTrainer`` against TRL 1.16's, same model, prompts and settings.

    python -m benchmarks.peers.grpo [--steps 10] [--rounds 2] [--peer-python PATH] [--quick]
                                    (from fastalign's venv; the peer venv of `make bench-peers`)

The workload, prepared once (``benchmarks/out/grpo_vs_trl/prep``): a Llama (hidden 256, 4 layers,
8 heads, the built-in character tokenizer) taught the built-in digit-sorting task by 60 SFT steps,
so its sampled answers end at uneven lengths as real ones do; 2,000 prompts of the task. Each run
is a fresh process (``--probe fastalign|trl``), interleaved round by round, training ``--steps``
GRPO steps with the same settings on both sides (``SETTINGS``: 8 prompts x 8 completions per
step, at most 24 new tokens, the KL term on, so both build a reference; fp32, no gradient
checkpointing, AdamW, linear schedule) and a reward both import from here. Per run: the step
times each trainer logs (``step_time``: generation, scoring, the forwards, the loss and the
optimizer step), the prompt and completion tokens it counts (``num_tokens``), the mean reward, and
the process's peak resident set, also measured just before ``train()``. The first step is a
warm-up, left out of the rates. Sampling differs between the two (each its own random stream), so
the rate is per real token: tokens per second over the timed steps. Writes
``benchmarks/out/grpo_vs_trl/results.md`` and ``runs.jsonl``.

This module imports neither fastalign nor TRL at the top: each probe imports its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.peers import report

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "out" / "grpo_vs_trl"
PEER_PYTHON = ROOT / "benchmarks" / "out" / "venv-peers" / "bin" / "python"
SYSTEMS = ("fastalign", "trl")
SETTINGS = dict(per_device_train_batch_size=64, num_generations=8, max_completion_length=24, temperature=1.0,
                learning_rate=1e-5, beta=0.04, epsilon=0.2, loss_type="dapo", scale_rewards="group", seed=0,
                lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1)


def sorted_reward(prompts, completions, **kwargs) -> list[float]:
    """The share of places where the answer holds the prompt's digits in sorted order."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        want = "".join(sorted(ch for ch in prompt.split("=")[0] if ch.isdigit()))
        got = completion.split("<eos>")[0].strip()
        scores.append(sum(a == b for a, b in zip(got, want)) / max(len(want), len(got), 1))
    return scores


def prepare(prep: Path) -> None:
    """The SFT'd model (saved for both trainers) and the prompts, once."""
    if (prep / "prompts.json").exists():
        return
    import torch

    from fastalign.algorithms import SFTConfig, SFTTrainer
    from fastalign.models.tiny import char_tokenizer, tiny_model
    from fastalign.tasks.sort_digits import make_rows

    torch.manual_seed(0)
    model, tokenizer = tiny_model("llama", hidden_size=256, layers=4, heads=8, seed=0), char_tokenizer()
    SFTTrainer(model, args=SFTConfig(output_dir=str(prep / "sft"), learning_rate=3e-3, max_steps=60,
                                     lr_scheduler_type="cosine", max_tokens_per_batch=1024, disable_tqdm=True),
               train_dataset=make_rows(6000, seed=1000), tokenizer=tokenizer).train()
    model.config._attn_implementation = "sdpa"  # what a plain transformers load takes
    model.save_pretrained(prep / "model")
    tokenizer.save_pretrained(prep / "model")
    rows = [{"prompt": r["prompt"]} for r in make_rows(2000, seed=5)]
    (prep / "prompts.json").write_text(json.dumps(rows))


def _records(path: Path, history: list[dict]) -> list[dict]:
    """Per step: seconds, tokens (prompt and completion) and the mean reward, from the logs."""
    logs = [h for h in history if "step_time" in h]
    out, seen = [], 0.0
    for log in logs:
        out.append({"seconds": log["step_time"], "tokens": log["num_tokens"] - seen, "reward": log.get("reward")})
        seen = log["num_tokens"]
    return out


def probe(system: str, prep: Path, run: Path, steps: int) -> None:
    rows = json.loads((prep / "prompts.json").read_text())
    model = str(prep / "model")
    if system == "fastalign":
        from fastalign.algorithms.grpo import GRPOConfig, GRPOTrainer
        from fastalign.engine.metrics import read_metrics

        config = GRPOConfig(output_dir=str(run), max_steps=steps, disable_tqdm=True, max_tokens_per_batch=4096,
                            overwrite_output_dir=True, **SETTINGS)
        trainer = GRPOTrainer(model, sorted_reward, args=config, train_dataset=rows)
        history = lambda: read_metrics(run)  # noqa: E731
    else:
        import datasets
        from transformers import AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(output_dir=str(run), max_steps=steps, disable_tqdm=True, save_strategy="no",
                            report_to="none", use_cpu=True, gradient_checkpointing=False, bf16=False,
                            dataloader_num_workers=0, **SETTINGS)
        trainer = GRPOTrainer(model, sorted_reward, args=config, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=AutoTokenizer.from_pretrained(model))
        history = lambda: trainer.state.log_history  # noqa: E731
    built = report.rss_bytes()
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    steps_seen = _records(run, history())
    timed = steps_seen[1:] or steps_seen
    report.emit({"system": system, "steps": len(steps_seen), "train_seconds": seconds,
                 "tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed),
                 "median_seconds_per_step": statistics.median(s["seconds"] for s in timed),
                 "tokens_per_step": sum(s["tokens"] for s in timed) / len(timed),
                 "rewards": [s["reward"] for s in steps_seen], "peak_rss_bytes": report.peak_rss_bytes(),
                 "built_rss_bytes": built, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")})


def run_probe(system: str, prep: Path, steps: int, python: Path, run: Path) -> dict:
    cmd = [str(python if system == "trl" else sys.executable), "-m", "benchmarks.peers.grpo", "--probe", system,
           str(prep), str(run), str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600,
                          env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{system} probe failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(runs: list[dict]) -> str:
    by = {s: [r for r in runs if r["system"] == s] for s in SYSTEMS}
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "median_seconds_per_step",
                                                                   "tokens_per_step", "peak_rss_bytes",
                                                                   "built_rss_bytes")} for s, rs in by.items()}
    gib = 2 ** 30
    lines = ["| system | tokens/s | s/step | tokens/step | peak RSS GiB | RSS before train() GiB | peak - before GiB |",
             "|---|---|---|---|---|---|---|"]
    for s in SYSTEMS:
        m = med[s]
        lines.append(f"| {'fastalign' if s == 'fastalign' else 'TRL 1.16'} | {m['tokens_per_s']:.0f} | "
                     f"{m['median_seconds_per_step']:.2f} | {m['tokens_per_step']:.0f} | {m['peak_rss_bytes'] / gib:.2f} | "
                     f"{m['built_rss_bytes'] / gib:.2f} | {(m['peak_rss_bytes'] - m['built_rss_bytes']) / gib:.2f} |")
    f, t = med["fastalign"], med["trl"]
    lines.append(f"\nfastalign / TRL: {f['tokens_per_s'] / t['tokens_per_s']:.2f}x the tokens/s, "
                 f"{f['peak_rss_bytes'] / t['peak_rss_bytes']:.2f}x the peak RSS "
                 f"({len(by['fastalign'])} and {len(by['trl'])} runs, medians).")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--probe":
        probe(argv[1], Path(argv[2]), Path(argv[3]), int(argv[4]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.grpo")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 round")
    args = parser.parse_args(argv)
    steps, rounds = (3, 1) if args.quick else (args.steps, args.rounds)
    python = Path(args.peer_python)
    if not python.exists():
        raise SystemExit(f"no peer venv at {python}: make bench-peers makes it")
    OUT.mkdir(parents=True, exist_ok=True)
    prepare(OUT / "prep")
    runs = []
    for rnd in range(rounds):
        for system in SYSTEMS:
            result = run_probe(system, OUT / "prep", steps, python, OUT / f"run-{system}-{rnd}")
            runs.append(result)
            print(f"round {rnd + 1}/{rounds} {system}: {result['tokens_per_s']:.0f} tokens/s, "
                  f"{result['median_seconds_per_step']:.2f} s/step, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB",
                  flush=True)
    with open(OUT / "runs.jsonl", "a") as f:
        for r in runs:
            f.write(json.dumps(r) + "\n")
    text = table(runs)
    (OUT / "results.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
