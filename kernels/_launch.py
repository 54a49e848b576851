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
import triton

# Multiprocessors assumed where the device has none to ask (the CPU under Triton's interpreter,
# where every program runs one after another: few programs, but enough to exercise every split).
SMS_OFF_GPU = 4
# The widest vocabulary tile of the row kernels (logprobs.py, kl.py): 16 elements a thread at 8 warps.
MAX_BLOCK_V = 4096


def multiprocessors(device: torch.device, off_gpu: int = SMS_OFF_GPU) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100/H200), ``off_gpu`` elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return off_gpu


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=num_warps)``.

    - ``kernel``: a triton ``JITFunction`` (an ``InterpretedFunction`` under ``TRITON_INTERPRET=1``)
    - ``grid``: programs along each grid axis, one to three ints
    - ``args``: the runtime arguments in the kernel's order (tensors, or ``meta`` tensors when only
      planned, strides and scalars)
    - ``constexprs``: the compile-time arguments by name
    - ``num_warps``: warps per program
    """

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4

    @property
    def programs(self) -> int:
        """Programs in the grid (0: nothing to launch)."""
        return math.prod(self.grid)

    def __call__(self) -> None:
        if self.programs:
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


def row_launch(kernel: object, rows: int, vocab: int, args: tuple, **constexprs: object) -> Launch:
    """A row kernel's launch: one program per row, vocabulary tiles ``BLOCK_V`` of up to
    ``MAX_BLOCK_V`` columns (a power of two), 8 warps from 2048 columns on (4 below)."""
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    return Launch(kernel, (rows,), args, {**constexprs, "BLOCK_V": block}, 8 if block >= 2048 else 4)
