"""The fused lm_head: token log-probs (and entropy) straight from hidden states.

    logits = hidden @ weight.T + bias           hidden [N, H], weight [V, H], bias [V]
    logp_i = log softmax(logits_i / T)[y_i]     (0 where y_i == ignore_index)
    H_i    = entropy of softmax(logits_i / T)   (optional, 0 where ignored)

A ``[N, V]`` logits tensor is never materialised.

Forward goes through the tokens in chunks of ``C`` rows: each chunk's ``[C, V]`` logits are one
matmul, reduced at once to the per-row softmax normaliser ``(max, log-sum)`` by the row kernels of
``logprobs.py`` (an online log-sum-exp over vocabulary tiles on the Triton path). Only that
normaliser (and ``H``) per token is kept.

Backward needs no online reduction any more (the normaliser is known), so it goes through the
vocabulary instead, in tiles of ``Vt`` columns for all ``N`` tokens: recompute ``[N, Vt]`` logits,
turn them in place into ``dL/dlogits`` (same row kernels), then

    grad_weight[tile] = dlogits.T @ hidden       grad_bias[tile] = dlogits.sum(0)
    grad_hidden      += dlogits @ weight[tile]   (an [N, H] fp32 accumulator)

Every matmul has a large inner dimension and each weight-gradient block is written once, where
chunking the backward over tokens would re-read and re-write the whole ``[V, H]`` weight gradient
per chunk. A per-token output has an unknown upstream gradient, so backward costs one recomputing
matmul on top of the naive three: 4/3 of the lm_head's own matmul time is the floor. Memory: one
chunk of logits, plus the gradients themselves.
"""

from __future__ import annotations

import torch

from .logprobs import RowOptions, check_labels, make_options, row_grad, row_stats

# Logits per forward chunk of tokens and per backward tile of the vocabulary (fp32 bytes): large
# enough for efficient matmuls; the row ops then work through each in smaller pieces.
CHUNK_BYTES = 64 * 2**20


def chunk_logits(hidden, weight, bias):
    """``[C, V]`` fp32 logits of one chunk, a fresh buffer the caller may overwrite."""
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return logits.float()


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: RowOptions, with_entropy: bool):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        norm = torch.empty(n, 2, dtype=torch.float32, device=hidden.device)
        ent = torch.empty_like(logp) if with_entropy else None
        step = opts.chunk_size or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        for s in range(0, n, step):
            e = min(s + step, n)
            logits = chunk_logits(hidden[s:e], weight, bias).unsqueeze(0)
            lp, nm, h = row_stats(logits, labels[s:e].unsqueeze(0), opts, with_entropy)
            logp[s:e], norm[s:e] = lp[0], nm[0]
            if with_entropy:
                ent[s:e] = h[0]
            del logits
        ctx.save_for_backward(hidden, weight, bias, labels, norm, ent)
        ctx.opts = opts
        if not with_entropy:
            return logp
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, labels, norm, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        (n, h), v = hidden.shape, weight.shape[0]
        low_precision = weight.dtype != torch.float32
        grad_h = torch.zeros(n, h, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        g_logp = None if grad_logp is None else grad_logp.float().contiguous().unsqueeze(0)
        g_ent = None if grad_ent is None else grad_ent.float().contiguous().unsqueeze(0)
        # Tiles over the vocabulary: every token's logits for columns v0:v1 at once.
        step = max(1, CHUNK_BYTES // (4 * n))
        for v0 in range(0, v, step):
            v1 = min(v0 + step, v)
            w_tile = weight[v0:v1]
            # 1. Recompute the tile's logits and turn them, in place, into dL/dlogits (fp32).
            dlogits = chunk_logits(hidden, w_tile, None if bias is None else bias[v0:v1]).unsqueeze(0)
            row_grad(
                dlogits, dlogits, labels.unsqueeze(0), norm.unsqueeze(0),
                None if ent is None else ent.unsqueeze(0), g_logp, g_ent, ctx.opts, col0=v0,
            )
            dlogits = dlogits[0]
            # 2. The matmuls run in the input dtype (fp32 accumulation inside each): the weight
            #    and bias tiles are written once; the hidden gradient sums over tiles in fp32.
            d = dlogits.to(weight.dtype) if low_precision else dlogits
            if need_h:
                if low_precision:
                    grad_h += d @ w_tile
                else:
                    grad_h.addmm_(d, w_tile)
            if need_w:
                torch.mm(d.t(), hidden, out=grad_w[v0:v1])
            if need_b:
                grad_b[v0:v1] = dlogits.sum(0)
            del dlogits, d  # free this tile before the next one exists
        return (None if grad_h is None else grad_h.to(hidden.dtype)), grad_w, grad_b, None, None, None


def linear_logprobs_reference(hidden, weight, labels, bias=None, ignore_index=-100, temperature=1.0, return_entropy=False):
    """Plain fp32: full logits, log_softmax, gather."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    logq = torch.log_softmax(logits / temperature, dim=-1)
    valid = labels != ignore_index
    logp = torch.where(valid, logq.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    if not return_entropy:
        return logp
    return logp, torch.where(valid, -(logq.exp() * logq).sum(-1), 0.0)


def linear_logprobs(
    hidden,
    weight,
    labels,
    bias=None,
    ignore_index=-100,
    temperature=1.0,
    *,
    return_entropy=False,
    chunk_size=None,
    backend=None,
):
    """fp32 log-prob of each label under ``softmax((hidden @ weight.T + bias) / temperature)``.

    ``hidden [..., H]``, ``weight [V, H]`` (the lm_head), ``labels [...]``, ``bias [V]`` optional.
    Returns ``logp [...]``, or ``(logp, entropy)`` with ``return_entropy=True``; both are 0 where the
    label is ``ignore_index``, and both are differentiable. ``chunk_size`` sets the tokens per chunk
    (default: one chunk of fp32 logits within 64 MiB).
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [..., H] and [V, H]")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} minus the hidden dim")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be [V] = [{weight.shape[0]}]")
    opts = make_options(hidden.device, ignore_index, temperature, chunk_size, backend)
    check_labels(labels, weight.shape[0], opts.ignore_index)
    if opts.backend == "reference":
        return linear_logprobs_reference(hidden, weight, labels, bias, ignore_index, temperature, return_entropy)
    out = _LinearLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1).long(), opts, return_entropy
    )
    if not return_entropy:
        return out.view(labels.shape)
    return out[0].view(labels.shape), out[1].view(labels.shape)
