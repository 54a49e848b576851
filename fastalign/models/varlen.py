"""Variable-length attention for packed rows, registered as the transformers backend ``fastalign_varlen``.

The packed forward passes ``cu_seq_lens_q`` / ``max_length_q`` (the batch's ``cu_seqlens`` and
``max_seqlen``); each sequence then attends only to itself, causally, and no ``[N, N]`` mask is
built. On CUDA it is torch's own ``varlen_attn`` (flash attention over the whole row). Elsewhere it
is one sdpa call per sequence (``is_causal=True``): the work is the sum of each sequence's length
squared, where sdpa over the whole row with transformers' block-diagonal mask costs the row length
squared (on a CPU, many times more for rows of many short sequences).

Calls without sequence boundaries (``generate`` on padded batches, any plain forward) take
transformers' sdpa path, with the mask sdpa would get. Only inside ``packed_rows()`` (the packed
forward) is no mask built.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F

NAME = "fastalign_varlen"


def _per_sequence_sdpa(q, k, v, cu: list[int], scaling, dropout: float):
    """``[1, heads, N, d]`` inputs; one causal sdpa per sequence; ``[1, N, heads, d]`` out."""
    gqa = q.shape[1] != k.shape[1]
    # split, not slicing: each slice's backward would write a zero-filled gradient of the whole row
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    outs = [
        F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
    ]
    return torch.cat(outs, dim=2).transpose(1, 2)


def _varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    dropout = dropout if module.training else 0.0
    if query.device.type != "cuda" or dropout > 0 or not cuda_varlen_available():
        return _per_sequence_sdpa(query, key, value, cu.tolist(), scaling, dropout), None
    from torch.nn.attention.varlen import varlen_attn

    # [1, heads, N, d] -> [N, heads, d]; the output goes back as [1, N, heads, d].
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    max_len = int(kwargs["max_length_q"])
    out = varlen_attn(q, k, v, cu.to(torch.int32), cu.to(torch.int32), max_len, max_len, scale=scaling,
                      window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])
    return out.unsqueeze(0), None


_state = threading.local()


@contextlib.contextmanager
def packed_rows():
    """Within it, forwards pass the sequence boundaries, so no mask is built (an ``[N, N]`` mask
    of a 64k-token row would take 4 GB)."""
    before = getattr(_state, "packed", False)
    _state.packed = True
    try:
        yield
    finally:
        _state.packed = before


def _mask(*args, **kwargs):
    """No mask inside ``packed_rows``; everywhere else the mask sdpa would get."""
    if getattr(_state, "packed", False):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_varlen_attention() -> bool:
    """Register the backend (and its mask rule) with transformers; False if this transformers
    has no attention registry."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(NAME, _varlen_attention)
    AttentionMaskInterface.register(NAME, _mask)
    return True


@functools.cache
def cuda_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True
