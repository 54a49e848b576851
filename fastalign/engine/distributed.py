"""Processes and DeepSpeed ZeRO: who am I, how many are we, and how the models are wrapped.

Launch with ``torchrun`` or ``deepspeed`` unchanged: the ranks come from the environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``). On CPU the processes talk over gloo (no extra
packages); on CUDA over NCCL.

The trained model runs under DeepSpeed when the config's ``deepspeed`` is set, or when there are
several processes (ZeRO stage 0 then). ``deepspeed`` is a DeepSpeed JSON file, a full DeepSpeed
config dict, or a short section::

    deepspeed: {stage: 3, offload_optimizer: true, offload_param: false}

fastalign fills in the rest from its own config: micro-batch 1 (a packed row), the accumulation
steps, ``gradient_clipping`` = ``max_grad_norm``, bf16, and torch's AdamW as the optimizer (kept
under CPU offload, so no DeepSpeed op is compiled). The loss of each micro-batch is scaled by the
number of processes: ZeRO averages gradients over ranks, fastalign wants the exact step mean.

The loss is computed inside the DeepSpeed engine's forward (``Engine.forward``): under ZeRO-3
the fused head reads ``lm_head.weight`` directly, and inside the engine's forward ZeRO-3 gathers
such a parameter and routes its gradient back to the shard.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .config import deepspeed_settings

if not torch.cuda.is_available():
    # DeepSpeed (imported by transformers when saving too) otherwise guesses, and warns, on CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over all processes (identity on one process)."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, device) -> int:
    """The largest ``value`` over all processes (identity on one process)."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def all_gather_floats(values: list[float], device) -> list[float]:
    """Every process's ``values`` (the same count on each), concatenated in rank order."""
    world = world_size()
    if world == 1 or not torch.distributed.is_initialized():
        return list(values)
    n = len(values)
    buf = [0.0] * (n * world)
    buf[rank() * n:(rank() + 1) * n] = values
    return all_reduce_sum(buf, device)


def import_deepspeed():
    """DeepSpeed, set up for this machine: its CPU accelerator when there is no CUDA, and without
    the shared-memory all-reduce op (used for inference only; it costs a 30 s compile on CPU)."""
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def init_distributed() -> None:
    """Join the process group the launcher described (no-op on one process or when joined)."""
    if world_size() == 1 or torch.distributed.is_initialized():
        return
    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


@contextlib.contextmanager
def local_main_first():
    """The block runs on each machine's main process first, then on the others (which find what
    it wrote, a tokenized data set's cache, instead of doing the work again)."""
    init_distributed()
    if local_rank() != 0:
        barrier()
    try:
        yield
    finally:
        if local_rank() == 0:
            barrier()


def deepspeed_config(config) -> dict:
    """The full DeepSpeed config for a fastalign ``TrainingConfig``."""
    given = deepspeed_settings(config.deepspeed)
    if "zero_optimization" in given:
        ds = given
    else:
        zero = {"stage": int(given.get("stage", 0))}
        if given.get("offload_optimizer"):
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if given.get("offload_param"):
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds = {"zero_optimization": zero}
    gas = config.gradient_accumulation_steps
    ds.update(
        train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=gas, train_batch_size=gas * world_size(),
        gradient_clipping=config.max_grad_norm or 0.0, bf16={"enabled": bool(config.bf16)},
        zero_allow_untested_optimizer=True, zero_force_ds_cpu_optimizer=False,
    )
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    if ds["zero_optimization"].get("stage") == 3:
        ds["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return ds


class LossModule(torch.nn.Module):
    """The module DeepSpeed wraps: holds the model, runs ``fn(*args)`` as its forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(*args)


def initialize_training(engine, config):
    """The DeepSpeed engine for the trained model, with fastalign's optimizer and schedule."""
    init_distributed()
    deepspeed = import_deepspeed()
    ds_engine, *_ = deepspeed.initialize(
        model=LossModule(engine.model), optimizer=engine.optimizer, lr_scheduler=engine.lr_scheduler,
        config=deepspeed_config(config),
    )
    return ds_engine


def wrap_for_inference(model, training_engine):
    """A frozen model (reference, reward) beside the trained one: sharded under ZeRO-3, else a
    replica on the training device. Always in eval mode without gradients."""
    model.requires_grad_(False).eval()
    if training_engine.zero_stage == 3:
        deepspeed = import_deepspeed()
        config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world_size(),
                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": bool(training_engine.config.bf16)}}
        ds_engine, *_ = deepspeed.initialize(model=model, config=config)
        return ds_engine.module
    return model.to(training_engine.device)


def full_state_dict(engine) -> dict | None:
    """The trained model's full state dict on the main process (None elsewhere); every process
    must call it under ZeRO-3, where it gathers the shards."""
    if engine.zero_stage == 3:
        state = engine.deepspeed._zero3_consolidated_16bit_state_dict()
        if state is None:
            return None
        return {k.removeprefix("model."): v for k, v in state.items()}
    return engine.model.state_dict() if is_main() else None
