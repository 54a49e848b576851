"""A kernel launch as data: what the wrappers run, and what the compile-for-GPU test compiles.

Each Triton wrapper first plans its launch (kernel, grid, arguments, compile-time options) with a
``*_launch`` function of its module, then runs it. The plan reads only shapes, strides and dtypes,
so the same function called on ``meta`` tensors (no memory) at realistic shapes tells the test in
``tests/kernels/test_compile_gpu.py`` exactly which specialisations the wrappers would compile and
how many programs each grid holds, without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Multiprocessors assumed where the device has none to ask (the CPU under Triton's interpreter,
# where every program runs one after another: few programs, but enough to exercise every split).
SMS_OFF_GPU = 4


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100/H200), ``SMS_OFF_GPU`` elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SMS_OFF_GPU


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=num_warps)``."""

    kernel: object  # a triton JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def __call__(self):
        if self.programs:
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)
