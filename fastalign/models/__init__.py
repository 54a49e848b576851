"""Models: Hugging Face causal LMs run packed, with fused heads."""

from .packed import body, lm_head, packed_hidden, packed_logprobs

__all__ = ["body", "lm_head", "packed_hidden", "packed_logprobs"]
