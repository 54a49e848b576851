"""One fastalign training run of the comparison with TRL, in its own process (fastalign's venv).

    python -m benchmarks.peers.fastalign_probe SYSTEM ALGO PREP_DIR RUN_DIR STEPS

``SYSTEM``: ``fastalign`` (as shipped: no gradient checkpointing) or ``fastalign-ckpt`` (with
``gradient_checkpointing=True``, the like-for-like peer of TRL's default). Trains ``STEPS`` optimizer steps of ``ALGO`` (dpo, reward, sft) from the prep folder's model and
rows and prints ``RESULT {json}``. fastalign normally packs rows into micro-batches by a token
budget (best-fit decreasing); here every step is exactly the next ``BATCH[algo]`` rows in file
order, packed into one padding-free row (``make_batches`` below), so each optimizer step covers
the same rows as TRL's batch of that size. Everything else is fastalign as shipped: its attention
backend, fused heads and losses, AdamW, linear schedule without warm-up, clipping at 1.0, fp32 (the
``cpu`` profile) or bf16 autocast (``gpu``), on CUDA when there is one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks.peers import report
from benchmarks.peers.workload import (
    BATCH,
    BETA,
    LEARNING_RATE,
    MAX_LENGTH,
    MAX_PROMPT_LENGTH,
    PAIR_TRUNCATION,
    SEED,
    SFT_TRUNCATION,
    digest,
    flat,
    pair_record,
    profile_of,
    workload,
)


def in_order(trainer_cls, rows_per_step: int):
    """``trainer_cls`` whose micro-batches are consecutive groups of ``rows_per_step`` units."""

    class InOrder(trainer_cls):
        def plan(self, store):
            kept = store.kept.tolist()
            if len(store.halves) == 2:  # preference pairs, as TRL's pre-tokenized columns
                self.data_digest = digest([flat(pair_record(_StoredPair(store, i)).values()) for i in kept])
            else:  # SFT: one sequence per unit
                self.data_digest = digest([store.unit(i)[0].input_ids.tolist() for i in kept])
            return [kept[i:i + rows_per_step] for i in range(0, len(kept), rows_per_step)]

    return InOrder


class _StoredPair:
    """Row ``i`` of a pair store with the fields of a ``fastalign.data.Pair`` that ``pair_record`` reads."""

    def __init__(self, store, i):
        (c, nc), (r, nr) = [(h.ids[i].tolist(), int(h.prompt[i])) for h in store.halves]
        self.chosen_prompt, self.chosen, self.rejected = c[:nc], c[nc:], r[nr:]


SYSTEMS = ("fastalign", "fastalign-ckpt")


def build(system: str, algo: str, prep: Path, run_dir: Path, steps: int):
    from transformers import AutoTokenizer

    from fastalign.algorithms import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    rows = workload(prep, algo, steps)["rows"]
    tokenizer = AutoTokenizer.from_pretrained(prep / "tokenizer")
    common = dict(
        output_dir=str(run_dir), learning_rate=LEARNING_RATE[algo], max_steps=steps, seed=SEED, shuffle=False,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        disable_tqdm=True, max_tokens_per_batch=2 * MAX_LENGTH * BATCH[algo], max_length=MAX_LENGTH,
        gradient_checkpointing=system == "fastalign-ckpt", bf16=profile_of(prep)["bf16"],
    )
    pairs = dict(max_prompt_length=MAX_PROMPT_LENGTH, truncation_mode=PAIR_TRUNCATION)
    if algo == "dpo":
        args = DPOConfig(beta=BETA, loss_type="sigmoid", **pairs, **common)
        return in_order(DPOTrainer, BATCH[algo])(str(prep / "causal"), args=args, train_dataset=rows,
                                                 tokenizer=tokenizer)
    if algo == "reward":
        args = RewardConfig(**pairs, **common)
        return in_order(RewardTrainer, BATCH[algo])(str(prep / "reward"), args=args, train_dataset=rows,
                                                    tokenizer=tokenizer)
    args = SFTConfig(truncation_mode=SFT_TRUNCATION, dataset_text_field="text", **common)
    return in_order(SFTTrainer, BATCH[algo])(str(prep / "causal"), args=args, train_dataset=rows, tokenizer=tokenizer)


def cpu_time_per_step(trainer) -> list[float]:
    """The process CPU seconds of each optimizer step (forward, backward, optimizer step), filled
    while ``trainer`` trains: from the start of ``_run_step`` to the end of ``engine.step``."""
    import torch

    spent, run_step, engine_step = [], trainer._run_step, trainer.engine.step

    def timed_run_step(group):
        trainer._cpu0 = time.process_time()
        return run_step(group)

    def timed_engine_step():
        norm = engine_step()
        if torch.cuda.is_available():  # the optimizer's kernels are in the step's time, as TRL's probe counts them
            torch.cuda.synchronize()
        spent.append(time.process_time() - trainer._cpu0)
        return norm

    trainer._run_step, trainer.engine.step = timed_run_step, timed_engine_step
    return spent


def main(system: str, algo: str, prep: Path, run_dir: Path, steps: int) -> None:
    if system not in SYSTEMS:
        raise SystemExit(f"unknown system {system!r}; expected one of {SYSTEMS}")
    trainer = build(system, algo, prep, run_dir, steps)
    cpu = cpu_time_per_step(trainer)
    built = report.rss_bytes()
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    from fastalign.engine.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if "seconds_per_step" in r]
    per_step = [{"seconds": r["seconds_per_step"], "real_tokens": r["num_tokens"] * (1 - r["padding_fraction"]),
                 "tokens": r["num_tokens"], "loss": r["loss"], "grad_norm": r["grad_norm"], "cpu_seconds": c}
                for r, c in zip(records, cpu)]
    params = sum(p.numel() for p in trainer.model.parameters())
    report.emit(report.summarise(system, algo, per_step, built, seconds, {
        "data_digest": trainer.data_digest, "attention": trainer.attention, "parameters": params,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
