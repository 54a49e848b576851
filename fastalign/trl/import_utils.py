"""``trl.import_utils``: which optional packages and devices are at hand (TRL 0.7.10's names)."""

from __future__ import annotations

import importlib.util

import torch


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def is_peft_available() -> bool:
    return _installed("peft")


def is_diffusers_available() -> bool:
    return _installed("diffusers")


def is_wandb_available() -> bool:
    return _installed("wandb")


def is_bitsandbytes_available() -> bool:
    return _installed("bitsandbytes")


def is_unsloth_available() -> bool:
    return _installed("unsloth")


def is_rich_available() -> bool:
    return _installed("rich")


def is_torch_greater_2_0() -> bool:
    return True  # fastalign needs torch >= 2.4


def is_xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def is_npu_available() -> bool:
    return hasattr(torch, "npu") and torch.npu.is_available()
