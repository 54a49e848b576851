"""The packed forward: one Hugging Face model body call per packed row, heads where they are needed.

The body runs on the whole row with ``position_ids`` restarting per sequence, no attention mask
and no cache: that is what makes transformers' sdpa and flash attention keep packed sequences
apart (with a cache, or a mask, sequences would silently attend to each other). The lm_head then
runs only at loss positions, through the fused ``linear_logprobs``; a sequence classifier's
scalar head runs only at each sequence's last token.
"""

from __future__ import annotations

import contextlib

import torch

from fastalign.data import IGNORE_INDEX, PackedBatch
from fastalign.kernels import linear_logprobs, segment_mean, segment_sum

from .varlen import packed_rows

# Backends that take the sequence boundaries directly (sdpa reads them from position_ids).
VARLEN_BACKENDS = ("flash_attention_2", "fastalign_varlen")


def body(model):
    """The transformer body under a causal-LM head (``model.model``, ``model.transformer``, ...)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrapper
    base = getattr(inner, "base_model", None)
    if base is None or base is inner:
        raise TypeError(f"{type(model).__name__} has no transformer body under its head")
    return base


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's ``(weight [V, H], bias [V] or None)``."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head.weight, getattr(head, "bias", None)


def packed_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states ``[N, H]`` of every token of the packed row."""
    varlen, context = {}, contextlib.nullcontext()
    if getattr(model.config, "_attn_implementation", None) in VARLEN_BACKENDS:
        varlen = dict(cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                      max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
        context = packed_rows()
    with context:
        out = body(model)(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False,
            **varlen,
        )
    return out.last_hidden_state[0]


def gathered(*params):
    """Context in which ZeRO-3-sharded ``params`` are whole (a no-op for ordinary tensors). The
    fused heads read weights directly, outside the module call where DeepSpeed would gather them."""
    sharded = [p for p in params if p is not None and getattr(getattr(p, "ds_status", None), "name", "") == "NOT_AVAILABLE"]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)


def head_logprobs(model, hidden: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                  return_entropy: bool = False):
    """fp32 log-prob of each label from rows of final hidden states, through the model's lm_head
    (fused ``linear_logprobs``, the weight gathered under ZeRO-3); with ``return_entropy`` also
    each row's entropy."""
    weight, bias = lm_head(model)
    with gathered(weight, bias):
        return linear_logprobs(hidden, weight, labels, bias, temperature=temperature, return_entropy=return_entropy)


def packed_logprobs(model, batch: PackedBatch, temperature: float = 1.0, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 log-prob of each token's label ``[N]``, 0 where no loss is taken.

    The lm_head runs only at the ``batch.num_loss_tokens`` loss positions; ``hidden`` (the row's
    final hidden states, when the caller already has them) saves the body call.
    """
    hidden = packed_hidden(model, batch) if hidden is None else hidden
    pos = (batch.labels != IGNORE_INDEX).nonzero()[:, 0]
    logp = head_logprobs(model, hidden[pos], batch.labels[pos], temperature)
    return torch.zeros(batch.num_tokens, dtype=torch.float32, device=hidden.device).index_put((pos,), logp)


def sequence_logprobs(model, batch: PackedBatch, average: bool = False) -> torch.Tensor:
    """fp32 ``[S]``: each sequence's summed (or, ``average``, mean) log-prob of its loss tokens."""
    logp = packed_logprobs(model, batch)
    if average:
        return segment_mean(logp, cu_seqlens=batch.cu_seqlens, mask=batch.labels != IGNORE_INDEX)
    return segment_sum(logp, cu_seqlens=batch.cu_seqlens)


SCORE_HEADS = ("score", "classifier")


def score_head(model) -> torch.nn.Module:
    """The scalar head of a sequence classifier (``score`` for Llama-style models)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in SCORE_HEADS:
        head = getattr(inner, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TypeError(f"{type(inner).__name__} has no scalar head (looked for {', '.join(SCORE_HEADS)})")


def packed_scores(model, batch: PackedBatch) -> torch.Tensor:
    """fp32 ``[S]``: the scalar head at each sequence's last token (its reward score)."""
    hidden = packed_hidden(model, batch)
    last = (batch.cu_seqlens[1:] - 1).long().to(hidden.device)
    return score_head(model)(hidden[last]).float()[:, 0]
