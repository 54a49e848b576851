"""The forward passes a PPO step runs, by the policy's kind: packed for a causal LM, padded for an
encoder-decoder LM (T5, BART: the query to the encoder, the response the decoder's tokens; packing
cannot isolate its sequences). ``PPOTrainer`` calls them through ``Forwards`` and never asks which.

Fields: ``value_model`` (the value-head wrapper), ``plan`` (sample lengths, token budget -> groups of
samples), ``collate`` (units -> a batch), ``hidden(model, batch, positions)`` (the lm_head's input
at those flat positions), ``head_logprobs(model, hidden, labels)``, ``policy`` (log-probs and
values at the loss positions, ``PolicyOutputs``), ``head(model) -> (weight, bias)`` (for the exact
KL), ``encoder_decoder`` (what generation cuts off).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from fastalign.data import pack, plan_batches, plan_padded
from fastalign.models import (
    CausalLMWithValueHead,
    Seq2SeqLMWithValueHead,
    head_logprobs,
    is_encoder_decoder,
    lm_head,
    packed_hidden,
    packed_logprobs_and_values,
    seq2seq_collator,
    seq2seq_logprobs_and_values,
)
from fastalign.models.seq2seq import seq2seq_head, seq2seq_head_logprobs, seq2seq_hidden


class Forwards(NamedTuple):
    value_model: type
    plan: Callable
    collate: Callable
    hidden: Callable
    head_logprobs: Callable
    policy: Callable
    head: Callable
    encoder_decoder: bool


def _packed_hidden_at(model, batch, positions):
    return packed_hidden(model, batch)[positions]


def _seq2seq_weights(model):
    weight, bias, _ = seq2seq_head(model)
    return weight, bias


PACKED = Forwards(CausalLMWithValueHead, plan_batches, pack, _packed_hidden_at, head_logprobs,
                  packed_logprobs_and_values, lm_head, False)


def forwards_for(model) -> Forwards:
    """The forwards for ``model`` (a causal or encoder-decoder LM, bare or under a value head)."""
    if not is_encoder_decoder(model):
        return PACKED
    plan = lambda lengths, budget: [g.tolist() for g in plan_padded(lengths, budget)]  # noqa: E731
    return Forwards(Seq2SeqLMWithValueHead, plan, seq2seq_collator(model), seq2seq_hidden, seq2seq_head_logprobs,
                    seq2seq_logprobs_and_values, _seq2seq_weights, True)
