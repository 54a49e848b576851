"""One process of a multi-process DPO / reward-model run under DeepSpeed (launched by torchrun from
the tests), several trainings one after another in the same processes to save launches.

    torchrun --standalone --nproc_per_node 2 dpo_worker.py OUT_DIR DEEPSPEED_JSON|none GAS RUN[,RUN...]

RUN is KIND or KIND:PAIRS; KIND is ``dpo`` (the default reference: a frozen copy of the model),
``dpo-precompute`` (``precompute_ref_log_probs=True``) or ``reward``, PAIRS the number of
sort-digits preference rows (default 44). Each run writes its metrics.jsonl and model.safetensors
to OUT_DIR/RUN (":" written "-"); after each run each process (re)writes OUT_DIR/rank{R}.json
with, per RUN done, what it holds of the trained and the reference models.
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)

from fastalign.algorithms import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer  # noqa: E402
from fastalign.models.packed import gathered  # noqa: E402
from fastalign.models.tiny import char_tokenizer, tiny_model  # noqa: E402
from fastalign.tasks.sort_digits import make_preference_pairs  # noqa: E402

# Pairs of 15-37 tokens, packed into micro-batches of at most 64 tokens (2-3 pairs each): 44 pairs
# make 19 micro-batches, 40 pairs 17. With 4 micro-batches per step, steps 1-4 are full and step 5
# has 3 (44 pairs: one process runs one real micro-batch and a weight-0 copy) or 1 (40 pairs: one
# process runs only weight-0 copies).
PAIRS = 44
COMMON = dict(max_steps=5, max_tokens_per_batch=64, disable_tqdm=True, seed=0)


def held(params) -> tuple[int, int]:
    """(elements this process holds, elements in all) of ``params``: a shard under ZeRO-3."""
    params = list(params)
    mine = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return mine, sum(getattr(p, "ds_numel", p.numel()) for p in params)


def model():
    return tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=1)


def drift(ref) -> float:
    """How far the reference's weights (gathered from the shards under ZeRO-3; every process
    calls this) are from the model before training."""
    before = dict(model().named_parameters())
    params = dict(ref.named_parameters())
    with gathered(*params.values()):
        return max(float((p.detach().cpu() - before[name]).abs().max()) for name, p in params.items())


def run(kind, out, deepspeed, gas, rows) -> dict:
    common = dict(output_dir=out, gradient_accumulation_steps=gas, deepspeed=deepspeed, **COMMON)
    if kind == "reward":
        args = RewardConfig(learning_rate=1e-2, **common)
        trainer = RewardTrainer(model(), args=args, train_dataset=rows, tokenizer=char_tokenizer())
    else:
        args = DPOConfig(learning_rate=1e-2, beta=0.1, loss_type="sigmoid",
                         precompute_ref_log_probs=kind == "dpo-precompute", **common)
        trainer = DPOTrainer(model(), ref_model=None, args=args, train_dataset=rows, tokenizer=char_tokenizer())
    result = trainer.train()
    ref = getattr(trainer, "ref_model", None)
    return {
        "steps_run": result["steps"], "stage": trainer.engine.zero_stage, "world": trainer.world_size,
        "batches": len(trainer.train_batches), "held": held(trainer.model.parameters()),
        "ref": None if ref is None else {
            "held": held(ref.parameters()), "grad": any(p.requires_grad for p in ref.parameters()),
            "training": ref.training, "drift": drift(ref),
            "separate": not {id(p) for p in ref.parameters()} & {id(p) for p in trainer.model.parameters()},
        },
    }


def main(out, deepspeed, gas, runs):
    report, rank = {}, int(os.environ.get("RANK", "0"))
    for spec in runs:
        kind, _, pairs = spec.partition(":")
        rows = make_preference_pairs(int(pairs or PAIRS), seed=0)
        report[spec] = run(kind, os.path.join(out, spec.replace(":", "-")), deepspeed, gas, rows)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:  # after each run: a later one may abort
            json.dump(report, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no destroy_process_group: gloo teardown can abort at exit


if __name__ == "__main__":
    out, config, gas, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
    main(out, json.loads(config) if config != "none" else None, gas, runs)
