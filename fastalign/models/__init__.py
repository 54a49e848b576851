"""Models: Hugging Face causal LMs and reward models run packed, encoder-decoder LMs padded, with fused heads."""

from .loading import (
    BUILTIN,
    as_reward_model,
    attention_backend,
    load_model,
    load_reward_model,
    load_tokenizer,
    prepare_model,
)
from .modes import eval_mode, train_mode
from .packed import (
    body,
    gathered,
    head_logprobs,
    lm_head,
    packed_hidden,
    packed_logprobs,
    packed_scores,
    score_head,
    sequence_logprobs,
)
from .seq2seq import (
    Seq2SeqBatch,
    Seq2SeqLMWithValueHead,
    batch_sequence_logprobs,
    is_encoder_decoder,
    seq2seq_collator,
    seq2seq_logprobs,
    seq2seq_logprobs_and_values,
    seq2seq_sequence_logprobs,
)
from .value_head import CausalLMWithValueHead, packed_logprobs_and_values

__all__ = [
    "BUILTIN", "attention_backend", "body", "lm_head", "load_model", "load_tokenizer", "packed_hidden", "packed_logprobs",
    "CausalLMWithValueHead", "packed_logprobs_and_values", "eval_mode", "train_mode",
    "as_reward_model", "load_reward_model", "prepare_model", "gathered", "head_logprobs", "packed_scores", "score_head", "sequence_logprobs",
    "Seq2SeqBatch", "Seq2SeqLMWithValueHead", "batch_sequence_logprobs", "is_encoder_decoder", "seq2seq_collator",
    "seq2seq_logprobs", "seq2seq_logprobs_and_values", "seq2seq_sequence_logprobs",
]
