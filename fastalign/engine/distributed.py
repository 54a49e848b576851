"""Processes and DeepSpeed: who am I, how many are we, and ZeRO for the trained and frozen models."""

from __future__ import annotations

import os

import torch


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


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over all processes (identity on one process)."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def initialize_training(engine, config):
    raise NotImplementedError("DeepSpeed support lands with the distributed engine")


def deepspeed_step(ds_engine) -> float:
    raise NotImplementedError("DeepSpeed support lands with the distributed engine")
