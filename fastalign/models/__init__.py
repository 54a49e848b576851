"""Models: Hugging Face causal LMs run packed, with fused heads."""

from .loading import BUILTIN, attention_backend, load_model, load_tokenizer
from .packed import body, lm_head, packed_hidden, packed_logprobs

__all__ = [
    "BUILTIN", "attention_backend", "body", "lm_head", "load_model", "load_tokenizer", "packed_hidden", "packed_logprobs",
]
