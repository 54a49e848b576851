"""One process of a 1- or 2-process PPO run (launched by torchrun from ``test_zero_ppo.py``),
several runs one after another in the same processes to keep the launches few.

    torchrun --standalone --nproc_per_node N ppo_worker.py OUT_DIR DEEPSPEED_JSON|none [RUN[,RUN...]]

RUN (default ``step``):

``step``
    3 calls of ``trainer.step(q, r, trainer.score(q, r))`` on fixed, seeded samples that are the
    same on every process (8 random-token queries of 2-6 tokens, responses of 1-5). With identical
    data everywhere the mean gradient over processes is the one-process gradient, so a 2-process
    ZeRO run must match the 1-process plain one. Each step's scalar stats (no ``time/*``, no
    arrays), the scores and the KL coefficient are recorded; the final model is saved to
    OUT_DIR/step (gathered from the shards under ZeRO-3). The adaptive KL controller moves by
    ``batch_size x processes / horizon`` per step (TRL's global batch), so ``horizon`` is
    ``HORIZON x processes`` to keep the coefficient's path the same for any number of processes.
``train``
    ``train()`` for 2 steps on sort-digits prompts (each process draws its own, the
    DistributedSampler) with a digit-count reward, once with ``max_new_tokens`` 4 and then 2 steps
    more (``max_steps`` raised: ``train()`` goes on from the steps done) with 8
    (``eos_token_id=None``: exactly that many new tokens). Every collective call made during each
    ``generate`` is counted, by name; under ZeRO-3 the policy's parameters are gathered once per
    rollout, so the counts must not grow with the number of new tokens. Then the same generations
    are counted without the whole-model context (the per-module ZeRO-3 hooks fetching every layer
    for every token), for the report only.

After each run each process (re)writes OUT_DIR/rank{R}.json with its reports.
"""

import contextlib
import functools
import json
import os
import sys
import threading
import traceback
from collections import Counter

import torch

torch.set_num_threads(1)

# ---- counting collective calls -----------------------------------------------------------------
# Installed before anything imports DeepSpeed: its communication backend keeps a reference to
# torch.distributed.all_gather_into_tensor (its ZeRO-3 parameter gather on CPU/gloo) taken when the
# process group is joined, so the counting wrapper must be what it finds then.
COLLECTIVES = (
    "all_gather_into_tensor", "_all_gather_base", "all_gather", "all_gather_coalesced", "all_gather_object",
    "broadcast", "broadcast_object_list", "all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all", "all_to_all_single", "gather", "scatter",
    "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)


class _Counting(threading.local):
    counts: Counter | None = None  # while counting: calls per collective name
    depth: int = 0  # a collective calling another (all_gather_object -> all_gather) counts once


_COUNTING = _Counting()


def _counted(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _COUNTING.counts is not None and _COUNTING.depth == 0:
            _COUNTING.counts[name] += 1
        _COUNTING.depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _COUNTING.depth -= 1

    return wrapper


def _install_counters():
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    wrappers = {}
    for name in COLLECTIVES:
        for module in (dist, c10d):
            fn = getattr(module, name, None)
            if fn is not None:
                wrappers.setdefault(id(fn), _counted(name, fn))
                setattr(module, name, wrappers[id(fn)])


_install_counters()


@contextlib.contextmanager
def counting():
    """Counts the collective calls made inside, by name, into the Counter it yields."""
    counts = Counter()
    _COUNTING.counts = counts
    try:
        yield counts
    finally:
        _COUNTING.counts = None


from fastalign.algorithms.ppo import PPOConfig, PPOTrainer  # noqa: E402
from fastalign.data import plan_batches  # noqa: E402
from fastalign.models import CausalLMWithValueHead, as_reward_model  # noqa: E402
from fastalign.models.tiny import char_tokenizer, tiny_model  # noqa: E402
from fastalign.tasks.sort_digits import make_rows  # noqa: E402

HORIZON = 50  # per process: the KL coefficient moves by 16 % of its error per step, visibly
STEPS = 3
BATCH = 8
MAX_TOKENS = 24  # 8 samples of 3-11 tokens: several packed rows per rollout
NEW_TOKENS = (4, 8)


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def held(params) -> tuple[int, int]:
    """(elements this process holds, elements in all) of ``params``: a shard under ZeRO-3."""
    params = list(params)
    mine = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return mine, sum(getattr(p, "ds_numel", p.numel()) for p in params)


def policy():
    return CausalLMWithValueHead(tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=1),
                                 summary_dropout_prob=0.0)


def reward_model():
    return as_reward_model(tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=3))


def samples(step: int):
    """The step's (queries, responses): the same on every process."""
    g = torch.Generator().manual_seed(1000 + step)

    def tokens(lo, hi):
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(4, 100, (n,), generator=g)

    queries = [tokens(2, 6) for _ in range(BATCH)]
    responses = [tokens(1, 5) for _ in range(BATCH)]
    return queries, responses


def scalars(stats: dict) -> dict:
    """The step's scalar stats, without the timings and the distributions."""
    out = {}
    for key, value in stats.items():
        if key.startswith("time/") or getattr(value, "ndim", 0) > 0:
            continue
        out[key] = float(value)
    return out


def run_step(out, deepspeed, report, flush) -> None:
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=2,
                       learning_rate=1e-2, max_tokens_per_batch=MAX_TOKENS, deepspeed=deepspeed, seed=0,
                       disable_tqdm=True, horizon=HORIZON * world(), output_dir=out)
    trainer = PPOTrainer(config=config, model=policy(), tokenizer=char_tokenizer(), reward_model=reward_model())
    report.update(stage=trainer.engine.zero_stage, world=trainer.world_size, held=held(trainer.model.parameters()),
                  ref_held=held(trainer.ref_model.parameters()), reward_held=held(trainer.reward_model.parameters()),
                  steps=[])
    flush()
    for step in range(STEPS):
        q, r = samples(step)
        scores = trainer.score(q, r)
        stats = trainer.step(q, r, scores)
        rows = len(plan_batches([len(a) + len(b) for a, b in zip(q, r)], MAX_TOKENS))
        report["steps"].append({"scores": scores.tolist(), "stats": scalars(stats), "rows": rows,
                                "kl_coef": float(trainer.kl_ctl.value)})
        flush()
    trainer.save_model(out)
    report["saved"] = True


def digit_reward(queries, responses):
    return [float(sum(c.isdigit() for c in text)) for text in responses]


def run_train(out, deepspeed, report, flush) -> None:
    rows = [{"query": row["prompt"]} for row in make_rows(64, seed=0)]
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3,
                       deepspeed=deepspeed, seed=0, disable_tqdm=True, output_dir=out)
    trainer = PPOTrainer(config=config, model=policy(), tokenizer=char_tokenizer(), dataset=rows)
    generate, into = trainer.generate, {"key": None}  # the report's list the next generations go to

    def counted_generate(queries, *args, **kwargs):
        with counting() as counts:
            responses = generate(queries, *args, **kwargs)
        report[into["key"]].append({"collectives": dict(counts), "lengths": [len(r) for r in responses],
                                    "queries": trainer.tokenizer.batch_decode(queries, skip_special_tokens=True)})
        flush()
        return responses

    trainer.generate = counted_generate  # what train() calls
    report.update(stage=trainer.engine.zero_stage, world=trainer.world_size, held=held(trainer.model.parameters()),
                  ref_held=held(trainer.ref_model.parameters()), params=len(list(trainer.model.parameters())))
    flush()
    for k in NEW_TOKENS:
        into["key"] = f"k{k}"
        report[into["key"]] = []
        config.max_steps = trainer.global_step + 2  # train() runs up to max_steps: 2 more steps
        result = trainer.train(reward_fn=digit_reward,
                               generation_kwargs={"max_new_tokens": k, "do_sample": True, "eos_token_id": None})
        report[f"k{k}_steps_run"] = result["steps"]
    # The same generations without the whole-model context: ZeRO-3's per-module hooks gather each
    # layer for each forward (one per new token). Reported, not asserted.
    trainer._generation_context = contextlib.nullcontext
    queries = [trainer.dataset[i]["input_ids"] for i in range(4)]
    for k in NEW_TOKENS:
        into["key"] = f"k{k}_per_module"
        report[into["key"]] = []
        try:
            counted_generate(queries, return_prompt=False, max_new_tokens=k, do_sample=True, eos_token_id=None)
        except Exception as e:  # noqa: BLE001  reported, not asserted
            report[into["key"]].append({"error": f"{type(e).__name__}: {e}"})


RUNS = {"step": run_step, "train": run_train}


def main(out, deepspeed, runs):
    reports, rank = {}, int(os.environ.get("RANK", "0"))

    def flush():  # after every stage: a later one may fail, or abort the process
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(reports, f)

    for name in runs:
        report = reports[name] = {}
        try:
            RUNS[name](os.path.join(out, name), deepspeed, report, flush)
        except BaseException as e:
            report["error"] = "".join(traceback.format_exception(e)[-6:])
            raise
        finally:
            report["done"] = "error" not in report
            flush()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no destroy_process_group: gloo teardown can abort at exit


if __name__ == "__main__":
    out, config = sys.argv[1], sys.argv[2]
    runs = sys.argv[3].split(",") if len(sys.argv) > 3 else ["step"]
    main(out, json.loads(config) if config != "none" else None, runs)
