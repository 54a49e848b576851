"""One process of a 1- or 2-process iterative-SFT run (launched by torchrun from
``test_zero_iterative_sft.py``), several runs one after another in the same processes to keep the
launches few.

    torchrun --standalone --nproc_per_node N iterative_sft_worker.py OUT_DIR DEEPSPEED_JSON|none [RUN[,RUN...]]

Each of the 3 ``trainer.step`` calls of a run is on its own fixed list of 9 odd-length rows (3-15
characters of the built-in char tokenizer, a prompt of 1-7 tokens labelled -100, some rows a -100
tail too), given as ``input_ids`` and ``labels``. Process R of N gets rows R::N: with 2 processes 5
rows on the first and 4 on the second; one process gets all 9. Micro-batches hold at most
``MAX_TOKENS`` tokens, so each process packs its rows into several, not as many as the other.

The optimizer is SGD with learning rate 1 (an update is the gradient itself, scale included: AdamW
would hide a wrong scale and amplify rounding where a gradient is near 0).

RUN (default ``full``):

``full``
    ``per_device_train_batch_size=None``: one optimizer step per call over every process's rows;
    no gradient clipping.
``minibatch``
    ``per_device_train_batch_size`` = 4 / N, ``gradient_accumulation_steps`` 2, ``shuffle=False``,
    gradients clipped at norm 1 (the default): 2 optimizer steps per call. With 2 processes the
    first step takes the first 4 rows of each process (the call's rows 0-7), the second the first
    process's last row (the call's row 8) while the second process, which has no row left, runs
    only weight-0 copies. One process with mini-batches of 4 takes rows 0-7, then row 8: the same
    optimizer steps.
``minibatch-shuffled``
    The same with ``shuffle=True`` (each process shuffles its own rows): no one-process equivalent.

Per call, each process records the stats (no timings) and the forwards it ran (the optimizer step,
the tokens, and whether it counts or is a weight-0 copy); after the 3 calls a digest of the whole
weights (gathered from the shards under ZeRO-3) and the saved model in OUT_DIR/RUN. After each call
each process (re)writes OUT_DIR/rank{R}.json with its reports.
"""

import hashlib
import json
import os
import sys
import traceback

import torch

torch.set_num_threads(1)

from fastalign.algorithms.iterative_sft import IterativeSFTConfig, IterativeSFTTrainer  # noqa: E402
from fastalign.data import IGNORE_INDEX  # noqa: E402
from fastalign.models.packed import gathered  # noqa: E402
from fastalign.models.tiny import char_tokenizer, tiny_model  # noqa: E402

STEPS = 3
ROWS = 9
MAX_TOKENS = 16  # rows of 3-15 tokens: 2-7 micro-batches per process and call
LR = 1.0  # SGD: the update is the gradient itself, its scale included
UNCOMPARED = {"seconds", "tokens_per_s"}  # the machine's, not the maths'
TOKENIZER = char_tokenizer()
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-=<>"


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def held(params) -> tuple[int, int]:
    """(elements this process holds, elements in all) of ``params``: a shard under ZeRO-3."""
    params = list(params)
    mine = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return mine, sum(getattr(p, "ds_numel", p.numel()) for p in params)


def model():
    return tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=1)


def rows(step: int) -> list[tuple[list[int], list[int]]]:
    """The call's 9 rows (ids, labels), the same list on every process."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for i in range(ROWS):
        n = 2 * int(torch.randint(1, 8, (1,), generator=g)) + 1  # 3 .. 15, odd
        text = "".join(ALPHABET[int(c)] for c in torch.randint(0, len(ALPHABET), (n,), generator=g))
        ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == n, (text, ids)
        prompt = int(torch.randint(1, n // 2 + 1, (1,), generator=g))
        tail = 1 if i % 3 == 2 and n - prompt > 2 else 0
        labels = [IGNORE_INDEX] * prompt + ids[prompt:n - tail] + [IGNORE_INDEX] * tail
        out.append((ids, labels))
    return out


def digest(params) -> str:
    """sha256 of the whole weights (every process calls it: ZeRO-3 gathers the shards)."""
    params = list(params)
    h = hashlib.sha256()
    with gathered(*params):
        for p in params:
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def options(kind: str) -> dict:
    if kind == "full":
        return {"max_grad_norm": None}  # no clipping: the weights see the gradient's scale
    # Mini-batches of 4 rows over all processes; clipped at 1 (the default): DeepSpeed's clipping.
    return {"per_device_train_batch_size": 4 // world(), "gradient_accumulation_steps": 2,
            "shuffle": kind == "minibatch-shuffled"}


def run(kind, out, deepspeed, report, flush) -> None:
    config = IterativeSFTConfig(output_dir=out, learning_rate=LR, max_tokens_per_batch=MAX_TOKENS, seed=0,
                                disable_tqdm=True, deepspeed=deepspeed, **options(kind))
    net = model()
    trainer = IterativeSFTTrainer(net, config, TOKENIZER, optimizers=(torch.optim.SGD(net.parameters(), lr=LR), None))
    forwards = []  # this call's forwards: (optimizer step, tokens, whether it counts: weight > 0)
    run_pass = trainer._pass

    def recorded(share, total_weight=None):
        forwards.extend((trainer.global_step + 1, int(batch.num_tokens), bool(counts)) for batch, counts in share)
        return run_pass(share, total_weight)

    trainer._pass = recorded
    report.update(stage=trainer.engine.zero_stage, world=trainer.world_size, held=held(trainer.model.parameters()),
                  steps=[])
    flush()
    for step in range(STEPS):
        mine = rows(step)[rank()::world()]
        forwards.clear()
        stats = trainer.step(input_ids=[ids for ids, _ in mine], labels=[labels for _, labels in mine])
        report["steps"].append({"stats": {k: v for k, v in stats.items() if k not in UNCOMPARED}, "rows": len(mine),
                                "tokens": sum(len(ids) for ids, _ in mine), "forwards": list(forwards),
                                "global_step": trainer.global_step})
        flush()
    report["digest"] = digest(trainer.model.parameters())
    trainer.save_model(out)
    report["saved"] = True


def main(out, deepspeed, runs):
    reports = {}

    def flush():  # after every call: a later one may fail, or abort the process
        with open(os.path.join(out, f"rank{rank()}.json"), "w") as f:
            json.dump(reports, f)

    for name in runs:
        report = reports[name] = {}
        try:
            run(name, os.path.join(out, name), deepspeed, report, flush)
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
    runs = sys.argv[3].split(",") if len(sys.argv) > 3 else ["full"]
    main(out, json.loads(config) if config != "none" else None, runs)
