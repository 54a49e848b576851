"""One process of a 1- or 2-process GRPO run (launched by torchrun from ``test_zero_grpo.py``).

    torchrun --standalone --nproc_per_node N grpo_worker.py OUT_DIR DEEPSPEED_JSON|none

``fixed``: 4 optimizer steps of ``GRPOTrainer.train()`` on the same 8 completions per generation
over all processes (2 prompts x 4; with 2 processes each takes one prompt's group), drawn by a
stand-in generator from the prompt alone (``FixedGenerator``), so every process count sees the
same rollouts; the KL term on (a reference model: sharded under ZeRO-3), 2 iterations per
generation (old log-probs), TRL's default dapo loss. Each step's logged scalars and the final
model (gathered under ZeRO-3) are written. Then ``sampled`` (2 processes only): 2 steps with the
model's own ``generate`` (the whole ZeRO-3 policy gathered once per generation), checking it runs.

Each process writes OUT_DIR/rank{R}.json with its reports.
"""

import json
import os
import sys
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_padded import FixedGenerator, token_reward  # noqa: E402

from fastalign.algorithms.grpo import GRPOConfig, GRPOTrainer  # noqa: E402
from fastalign.engine.metrics import read_metrics  # noqa: E402
from fastalign.models.tiny import char_tokenizer, tiny_model  # noqa: E402
from fastalign.tasks.sort_digits import make_rows  # noqa: E402

PROMPTS = [{"prompt": r["prompt"]} for r in make_rows(16, seed=0)]
STEPS = 4


def held(params) -> tuple[int, int]:
    """(elements this process holds, elements in all): a shard under ZeRO-3."""
    params = list(params)
    mine = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return mine, sum(getattr(p, "ds_numel", p.numel()) for p in params)


def config(out, deepspeed, **more):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return GRPOConfig(output_dir=out, per_device_train_batch_size=8 // world, num_generations=4, beta=0.04,
                      num_iterations=2, max_completion_length=6, learning_rate=1e-2, max_tokens_per_batch=32,
                      deepspeed=deepspeed, seed=0, disable_tqdm=True, **more)


def run_fixed(out, deepspeed, report) -> None:
    trainer = GRPOTrainer(tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=1), token_reward,
                          args=config(out, deepspeed, max_steps=STEPS), train_dataset=PROMPTS,
                          processing_class=char_tokenizer(), generator=FixedGenerator(100))
    report.update(stage=trainer.engine.zero_stage, world=trainer.world_size, held=held(trainer.model.parameters()),
                  ref_held=held(trainer.ref_model.parameters()))
    trainer.train()
    skip = ("time/", "step_time", "peak_memory_gb")
    report["steps"] = [{k: v for k, v in r.items() if not k.startswith(skip)} for r in read_metrics(out)]


def run_sampled(out, deepspeed, report) -> None:
    trainer = GRPOTrainer(tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=1), "sort_digits",
                          args=config(out, deepspeed, max_steps=2), train_dataset=PROMPTS,
                          processing_class=char_tokenizer())
    result = trainer.train()
    report.update(steps=result["steps"], loss=result["loss"], lengths=result["completions/mean_length"])


def main(out, deepspeed):
    rank, reports = int(os.environ.get("RANK", "0")), {}
    runs = {"fixed": run_fixed}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        runs["sampled"] = run_sampled
    for name, run in runs.items():
        report = reports[name] = {}
        try:
            run(os.path.join(out, name), deepspeed, report)
        except BaseException as e:
            report["error"] = "".join(traceback.format_exception(e)[-6:])
            raise
        finally:
            report["done"] = "error" not in report
            with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
                json.dump(reports, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no destroy_process_group: gloo teardown can abort at exit


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]) if sys.argv[2] != "none" else None)
