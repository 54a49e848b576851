"""fastalign's kernel library: fused log-prob, preference and segment ops.

Each op with a kernel dispatches on its input's device (Triton on CUDA, torch elsewhere); set
``FASTALIGN_KERNELS=triton|torch|reference`` or pass ``backend=`` to force a path.
"""

from ._dispatch import BACKENDS, resolve_backend
from .fused_preference import PreferenceLossOutput, fused_preference_loss
from .linear_logprobs import linear_logprobs, linear_logprobs_reference
from .logprobs import (
    entropy_from_logits,
    entropy_from_logits_reference,
    selective_logprobs,
    selective_logprobs_reference,
)
from .preference import COUPLED_LOSS_TYPES, LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, preference_loss, reward_loss
from .segments import segment_mean, segment_sum, segment_sum_reference

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "selective_logprobs",
    "selective_logprobs_reference",
    "linear_logprobs",
    "linear_logprobs_reference",
    "entropy_from_logits",
    "entropy_from_logits_reference",
    "segment_sum",
    "segment_mean",
    "segment_sum_reference",
    "LOSS_TYPES",
    "COUPLED_LOSS_TYPES",
    "REFERENCE_FREE_LOSS_TYPES",
    "preference_loss",
    "reward_loss",
    "fused_preference_loss",
    "PreferenceLossOutput",
]
