"""The fused lm_head: token log-probs (and entropy) straight from hidden states.

    logits = hidden @ weight.T + bias           hidden [N, H], weight [V, H], bias [V]
    logp_i = log softmax(logits_i / T)[y_i]     (0 where y_i == ignore_index)
    H_i    = entropy of softmax(logits_i / T)   (optional, 0 where ignored)

A ``[N, V]`` logits tensor is never materialised. Tokens go through in chunks of ``C`` rows: each
chunk's ``[C, V]`` logits are one matmul, reduced at once to the per-row softmax normaliser by the
row kernels of ``logprobs.py`` (an online log-sum-exp over vocabulary tiles on the Triton path).
Only that normaliser (and ``H``) per token is kept. Backward recomputes each chunk's logits, turns them in place
into ``dL/dlogits`` (same row kernels), and accumulates

    grad_hidden[chunk] = dlogits @ weight        grad_weight += dlogits.T @ hidden[chunk]
    grad_bias += dlogits.sum(0)

with ``grad_weight``/``grad_bias`` accumulated in fp32. A per-token output has an unknown upstream
gradient, so backward costs one recomputing matmul on top of the naive three: 4/3 of the
lm_head's own matmul time is the floor. Memory: one chunk of logits plus the gradients.
"""

from __future__ import annotations

import dataclasses

import torch

from .logprobs import RowOptions, check_labels, make_options, row_grad, row_stats


def _chunk_logits(hidden, weight, bias):
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
        step = opts.rows_per_chunk(weight.shape[0])
        row_opts = dataclasses.replace(opts, chunk_size=step)  # a chunk is one pass of the row ops
        for s in range(0, n, step):
            e = min(s + step, n)
            logits = _chunk_logits(hidden[s:e], weight, bias).unsqueeze(0)
            lp, nm, h = row_stats(logits, labels[s:e].unsqueeze(0), row_opts, with_entropy)
            logp[s:e], norm[s:e] = lp[0], nm[0]
            if with_entropy:
                ent[s:e] = h[0]
        ctx.save_for_backward(hidden, weight, bias, labels, norm, ent)
        ctx.opts, ctx.step = row_opts, step
        if not with_entropy:
            return logp
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, labels, norm, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, step = hidden.shape[0], ctx.step
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        g_logp = None if grad_logp is None else grad_logp.float().contiguous()
        g_ent = None if grad_ent is None else grad_ent.float().contiguous()
        for s in range(0, n, step):
            e = min(s + step, n)
            dlogits = _chunk_logits(hidden[s:e], weight, bias).unsqueeze(0)
            row_grad(
                dlogits, dlogits, labels[s:e].unsqueeze(0), norm[s:e].unsqueeze(0),
                None if ent is None else ent[s:e].unsqueeze(0),
                None if g_logp is None else g_logp[s:e].unsqueeze(0),
                None if g_ent is None else g_ent[s:e].unsqueeze(0),
                ctx.opts,
            )
            dlogits = dlogits[0]
            if need_h:
                torch.mm(dlogits.to(weight.dtype), weight, out=grad_h[s:e])
            if need_w:
                grad_w.addmm_(dlogits.t(), hidden[s:e].float())
            if need_b:
                grad_b += dlogits.sum(0)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None,
        )


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
