"""``trl.import_utils``: which optional packages and devices are at hand (TRL 0.7.10's names)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch


def _installed(package: str) -> Callable[[], bool]:
    """``is_<package>_available``: whether ``package`` can be imported."""

    def available() -> bool:
        return importlib.util.find_spec(package) is not None

    available.__name__ = f"is_{package}_available"
    return available


is_peft_available = _installed("peft")
is_diffusers_available = _installed("diffusers")
is_wandb_available = _installed("wandb")
is_bitsandbytes_available = _installed("bitsandbytes")
is_unsloth_available = _installed("unsloth")
is_rich_available = _installed("rich")


def is_torch_greater_2_0() -> bool:
    return True  # fastalign needs torch >= 2.4


def is_xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def is_npu_available() -> bool:
    return hasattr(torch, "npu") and torch.npu.is_available()
