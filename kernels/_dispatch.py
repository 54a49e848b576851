"""Which path runs an op: ``triton``, ``torch`` or ``reference``.

Default: Triton on CUDA tensors, the chunked torch path everywhere else. The environment
variable ``FASTALIGN_KERNELS=triton|torch|reference`` forces one path for every op (debugging,
benchmarks); an explicit ``backend=`` argument to an op wins over both.

Off GPU, Triton kernels run only under its interpreter, which Triton reads when a kernel is
decorated: ``TRITON_INTERPRET=1`` must be set before ``fastalign.kernels`` is imported.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch", "reference")

# Read once, as Triton does: flipping the variable later has no effect on decorated kernels.
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The path to run on ``device``: ``backend`` if given, else $FASTALIGN_KERNELS, else by device."""
    name = backend or os.environ.get("FASTALIGN_KERNELS") or None
    if name is None:
        return "triton" if device.type == "cuda" else "torch"
    if name not in BACKENDS:
        source = "backend" if backend else "FASTALIGN_KERNELS"
        raise ValueError(f"{source}={name!r} is not a kernel path; expected one of {BACKENDS}")
    if name == "triton" and device.type != "cuda" and not TRITON_INTERPRETER:
        raise RuntimeError(
            f"the triton path needs CUDA tensors (got {device.type}); to run it on the CPU, set "
            "TRITON_INTERPRET=1 before importing fastalign"
        )
    return name
