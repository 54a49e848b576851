"""One TRL training run of the comparison, in its own process (the peer venv: TRL, no fastalign).

    python -m benchmarks.peers.trl_probe SYSTEM ALGO PREP_DIR RUN_DIR STEPS

``SYSTEM``:

- ``trl``: TRL's trainer with its padded batches, settings matched to fastalign's run: fp32 (or
  bf16 autocast: the ``gpu`` profile), on CUDA when there is one, no gradient checkpointing (TRL
  turns it on by default; fastalign does not), AdamW with the same learning rate, linear schedule
  without warm-up, clipping at 1.0;
- ``trl-ckpt``: the same with TRL's default gradient checkpointing on;
- ``trl-liger``: ``trl`` with ``use_liger_kernel=True`` (transformers patches the model's layers
  with Liger's Triton kernels).

TRL is given the token ids fastalign's tokenisation and truncation made (``data.json``), in file
order (``train_sampling_strategy="sequential"``), ``BATCH[algo]`` rows per optimizer step. For
DPO its dataset preparation (prompt extraction, tokenisation) is skipped since the ids are given;
reward modeling and SFT take pre-tokenized ids natively. Per step: the time from
``on_step_begin`` to ``on_step_end`` (forward, backward, optimizer step: the batch is already
collated) and the process CPU time over it, the trained model's real and padded input tokens (a forward pre-hook reading the
attention mask), and the logged loss and gradient norm. Prints ``RESULT {json}``.
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
    SEED,
    SFT_TRUNCATION,
    digest,
    profile_of,
    workload,
)

SYSTEMS = ("trl", "trl-ckpt", "trl-liger")


def build(system: str, algo: str, prep: Path, run_dir: Path, steps: int):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    ids = workload(prep, algo, steps)["ids"]
    tokenizer = AutoTokenizer.from_pretrained(prep / "tokenizer")
    common = dict(
        output_dir=str(run_dir), learning_rate=LEARNING_RATE[algo], max_steps=steps, seed=SEED, data_seed=SEED,
        per_device_train_batch_size=BATCH[algo], gradient_accumulation_steps=1, train_sampling_strategy="sequential",
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        bf16=profile_of(prep)["bf16"], fp16=False,
        gradient_checkpointing=system == "trl-ckpt", use_liger_kernel=system == "trl-liger",
        dataloader_num_workers=0,
    )
    dataset = datasets.Dataset.from_list(ids)
    if algo == "dpo":
        class PreTokenizedDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, *args, **kwargs):  # the ids are given: nothing to tokenize
                return dataset

        model = AutoModelForCausalLM.from_pretrained(prep / "causal")
        args = DPOConfig(beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH, **common)
        return PreTokenizedDPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    if algo == "reward":
        dataset = datasets.Dataset.from_list([{"chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                                               "rejected_ids": r["prompt_ids"] + r["rejected_ids"]} for r in ids])
        model = AutoModelForSequenceClassification.from_pretrained(prep / "reward", num_labels=1)
        args = RewardConfig(max_length=MAX_LENGTH, **common)
        return RewardTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(prep / "causal")
    args = SFTConfig(max_length=MAX_LENGTH, truncation_mode=SFT_TRUNCATION, packing=False, padding_free=False, **common)
    return SFTTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)


def main(system: str, algo: str, prep: Path, run_dir: Path, steps: int) -> None:
    import torch
    from transformers import TrainerCallback

    if system not in SYSTEMS:
        raise SystemExit(f"unknown system {system!r}; expected one of {SYSTEMS}")
    trainer = build(system, algo, prep, run_dir, steps)
    counts = {"real": 0, "all": 0}

    def count_tokens(module, args, kwargs):
        if module.training and torch.is_grad_enabled():  # the trained model's forward (not the reference's)
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids")
            counts["real"] += int(mask.sum()) if mask is not None else ids.numel()
            counts["all"] += ids.numel()

    trainer.model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    per_step = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            counts.update(real=0, all=0)
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            per_step.append({"seconds": time.perf_counter() - self.t0, "real_tokens": counts["real"],
                             "tokens": counts["all"], "cpu_seconds": time.process_time() - self.cpu0})

    trainer.add_callback(Timer())
    built = report.rss_bytes()
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    for record, log in zip(per_step, logs):
        record.update(loss=log["loss"], grad_norm=log.get("grad_norm"))
    rows = trainer.train_dataset
    if algo == "dpo":
        data = [r["prompt_ids"] + r["chosen_ids"] + r["rejected_ids"] for r in rows]
    elif algo == "reward":  # the prompt is the common prefix of both halves, as fastalign splits it
        data = [_pair_fingerprint(r["chosen_ids"], r["rejected_ids"]) for r in rows]
    else:
        data = [r["input_ids"] for r in rows]
    import transformers
    import trl

    report.emit(report.summarise(system, algo, per_step, built, seconds, {
        "data_digest": digest(data), "attention": trainer.model.config._attn_implementation,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "trl": trl.__version__, "transformers": transformers.__version__,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
    }))


def _pair_fingerprint(chosen: list[int], rejected: list[int]) -> list[int]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen + rejected[n:]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
