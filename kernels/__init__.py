"""fastalign's kernel library: fused log-prob ops with Triton, chunked-torch and reference paths.

Each op dispatches on its input's device (Triton on CUDA, torch elsewhere); set
``FASTALIGN_KERNELS=triton|torch|reference`` or pass ``backend=`` to force a path.
"""

from ._dispatch import BACKENDS, resolve_backend
from .linear_logprobs import linear_logprobs, linear_logprobs_reference
from .logprobs import (
    entropy_from_logits,
    entropy_from_logits_reference,
    selective_logprobs,
    selective_logprobs_reference,
)

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "selective_logprobs",
    "selective_logprobs_reference",
    "linear_logprobs",
    "linear_logprobs_reference",
    "entropy_from_logits",
    "entropy_from_logits_reference",
]
