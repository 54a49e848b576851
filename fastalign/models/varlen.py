"""torch's own variable-length flash attention (CUDA only), registered as a transformers backend.

The packed forward passes ``cu_seq_lens_q`` / ``max_length_q`` (the batch's ``cu_seqlens`` and
``max_seqlen``); each sequence then attends only to itself, causally. Calls without them (for
example ``generate`` on padded batches) fall back to sdpa.
"""

from __future__ import annotations

import torch

NAME = "fastalign_varlen"


def _varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from torch.nn.attention.varlen import varlen_attn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # [1, heads, N, d] -> [N, heads, d]; the output goes back as [1, N, heads, d].
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    max_len = int(kwargs["max_length_q"])
    out = varlen_attn(q, k, v, cu.to(torch.int32), cu.to(torch.int32), max_len, max_len, scale=scaling,
                      window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])
    return out.unsqueeze(0), None


def register_varlen_attention() -> bool:
    """Register the backend with transformers; False when this torch has no ``varlen_attn``."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(NAME, _varlen_attention)
    return True
