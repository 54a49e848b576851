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

``C`` and ``Vt`` come from ``chunk_plan``, which says why: on CUDA a chunk holds up to 1 GiB of
logits and at least 16 rows per multiprocessor (the row kernels run a program per row; at V=128256
in bf16, 4096 rows), where the CPU keeps 64 MiB of fp32; ``Vt`` is a multiple of 128 columns (of the
row kernels' 4096-wide tile once that wide). The Triton path keeps the logits in the weight's dtype
(its row kernels read bf16/fp16 and accumulate in fp32); the torch path works in fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ._dispatch import TRITON_INTERPRETER
from ._launch import MAX_BLOCK_V, multiprocessors
from .logprobs import RowOptions, check_labels, make_options, row_grad, row_stats

# Set to 1 to run the fused Triton lm_head (fused_head.py) where linear_logprobs is called.
FUSED_HEAD_ENV = "FASTALIGN_FUSED_HEAD"
# On the CPU: logits per forward chunk of tokens and per backward tile of the vocabulary (fp32
# bytes), large enough for efficient matmuls; the row ops then work through each in smaller pieces.
CHUNK_BYTES = 64 * 2**20
# On CUDA: logits (in the weight's dtype) per chunk or tile, and the fewest rows a forward chunk
# holds: the row kernels run one program per row, and a 132-SM GPU wants thousands of them (and
# each chunk's matmul re-reads the whole lm_head weight, so the fewer chunks the better).
GPU_CHUNK_BYTES = 1 << 30
GPU_PROGRAMS_PER_SM = 16
# Backward vocabulary tiles are a multiple of this many columns (16-byte aligned rows for any
# dtype, whole warps of the row kernels), and of the row kernels' tile once they reach it.
TILE_COLS = 128


@dataclass(frozen=True)
class ChunkPlan:
    """How ``linear_logprobs`` cuts its work.

    - ``rows``: tokens per forward chunk (its logits are ``[rows, V]``)
    - ``cols``: vocabulary columns per backward tile (its logits are ``[N, cols]``)
    - ``logits_dtype``: the dtype chunk and tile logits are kept in
    - ``reason``: why, in words (device, byte budget, the sizes chosen)
    """

    rows: int
    cols: int
    logits_dtype: torch.dtype
    reason: str


def check_head_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """The shapes and dtypes an lm_head op takes: ``hidden [..., H]``, ``weight [V, H]`` of the same
    dtype, ``labels`` shaped like ``hidden`` without its last dimension, ``bias [V]`` or None."""
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [..., H] and [V, H]")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} minus the hidden dim")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be [V] = [{weight.shape[0]}]")


def _round_cols(cols: int, vocab: int) -> int:
    """A tile width: a multiple of the row kernels' tile (or of TILE_COLS below it), at most V."""
    step = MAX_BLOCK_V if cols >= MAX_BLOCK_V else TILE_COLS
    return min(max(TILE_COLS, cols // step * step), vocab)


def chunk_plan(n: int, vocab: int, dtype: torch.dtype, device: torch.device, backend: str,
               chunk_size: int | None = None, cpu_bytes: int | None = None, sms: int | None = None) -> ChunkPlan:
    """The forward chunk and backward tile for ``n`` tokens over a vocabulary of ``vocab``.

    Sizes follow the device: on CUDA chunks of up to ``GPU_CHUNK_BYTES`` of logits but at least
    ``GPU_PROGRAMS_PER_SM`` rows per multiprocessor; elsewhere ``cpu_bytes`` (default
    ``CHUNK_BYTES``) of fp32 logits. The dtype follows the path: the Triton row kernels read the
    weight's dtype (no fp32 copy of the logits), the torch row ops want fp32.
    ``chunk_size`` forces the rows per chunk; ``sms`` stands in for the device's multiprocessors.
    """
    logits_dtype = dtype if backend == "triton" else torch.float32
    if device.type == "cuda":
        size = torch.empty((), dtype=logits_dtype).element_size()
        sms = sms or multiprocessors(device)
        rows = max(GPU_CHUNK_BYTES // (size * vocab) // 128 * 128, GPU_PROGRAMS_PER_SM * sms)
        cols = _round_cols(GPU_CHUNK_BYTES // (size * max(n, 1)), vocab)
        how = f"cuda ({sms} SMs): logits within {GPU_CHUNK_BYTES >> 20} MiB, >= {GPU_PROGRAMS_PER_SM} rows per SM"
    else:
        budget = CHUNK_BYTES if cpu_bytes is None else cpu_bytes
        rows = max(1, budget // (4 * vocab))
        cols = _round_cols(budget // (4 * max(n, 1)), vocab)
        how = f"{device.type}: logits within {budget / 2**20:g} MiB of fp32"
    if chunk_size:
        rows, how = chunk_size, how + f", chunk_size={chunk_size}"
    rows = min(rows, max(n, 1))
    reason = f"{how}: {str(logits_dtype)[6:]} chunks of {rows} rows, backward tiles of {cols} columns"
    return ChunkPlan(rows, cols, logits_dtype, reason)


def head_choice(device: torch.device, backend: str | None = None) -> tuple[str, str]:
    """Which lm_head path ``linear_logprobs`` runs, ``"fused"`` or ``"chunked"``, and why.

    The fused Triton path (``fused_head.py``) keeps the logits on chip; it is checked against the
    fp32 reference under Triton's interpreter and compiled for sm_80/sm_90 (wgmma/mma, no spills),
    but has not yet run natively on a GPU, so it is opt-in until ``benchmarks/gpu_session.sh``
    measures it: ``backend="fused"``, or ``FASTALIGN_FUSED_HEAD=1`` on CUDA (or under the
    interpreter). Otherwise the chunked path: cuBLAS matmuls per chunk, then the row kernels.
    """
    if backend == "fused":
        return "fused", "backend='fused'"
    if backend is None and os.environ.get(FUSED_HEAD_ENV) == "1" and (device.type == "cuda" or TRITON_INTERPRETER):
        return "fused", f"{FUSED_HEAD_ENV}=1"
    return "chunked", "chunked: the fused path is opt-in until it is measured on a GPU"


def chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[C, V]`` logits of one chunk in ``dtype``, a fresh buffer the caller may overwrite."""
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return logits.to(dtype)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: RowOptions, with_entropy: bool):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        norm = torch.empty(n, 2, dtype=torch.float32, device=hidden.device)
        ent = torch.empty_like(logp) if with_entropy else None
        plan = chunk_plan(n, weight.shape[0], weight.dtype, hidden.device, opts.backend, opts.chunk_size)
        step = plan.rows
        for s in range(0, n, step):
            e = min(s + step, n)
            logits = chunk_logits(hidden[s:e], weight, bias, plan.logits_dtype).unsqueeze(0)
            lp, nm, h = row_stats(logits, labels[s:e].unsqueeze(0), opts, with_entropy)
            logp[s:e], norm[s:e] = lp[0], nm[0]
            if with_entropy:
                ent[s:e] = h[0]
            del logits
        ctx.save_for_backward(hidden, weight, bias, labels, norm, ent)
        ctx.opts, ctx.plan = opts, plan
        if not with_entropy:
            return logp
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, labels, norm, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        (n, h), v = hidden.shape, weight.shape[0]
        plan = ctx.plan
        grad_h = torch.zeros(n, h, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        g_logp = None if grad_logp is None else grad_logp.float().contiguous().unsqueeze(0)
        g_ent = None if grad_ent is None else grad_ent.float().contiguous().unsqueeze(0)
        # Tiles over the vocabulary: every token's logits for columns v0:v1 at once.
        for v0 in range(0, v, plan.cols):
            v1 = min(v0 + plan.cols, v)
            w_tile = weight[v0:v1]
            # 1. Recompute the tile's logits and turn them, in place, into dL/dlogits (fp32 on
            #    the torch path; in the weight's dtype on the Triton path, as the matmuls take them).
            b_tile = None if bias is None else bias[v0:v1]
            dlogits = chunk_logits(hidden, w_tile, b_tile, plan.logits_dtype).unsqueeze(0)
            row_grad(
                dlogits, dlogits, labels.unsqueeze(0), norm.unsqueeze(0),
                None if ent is None else ent.unsqueeze(0), g_logp, g_ent, ctx.opts, col0=v0,
            )
            dlogits = dlogits[0]
            # 2. The matmuls run in the input dtype (fp32 accumulation inside each): the weight
            #    and bias tiles are written once; the hidden gradient sums over tiles in fp32.
            d = dlogits.to(weight.dtype)  # no copy when the logits already are in that dtype
            if need_h:
                if d.dtype != torch.float32:
                    grad_h += d @ w_tile
                else:
                    grad_h.addmm_(d, w_tile)
            if need_w:
                torch.mm(d.t(), hidden, out=grad_w[v0:v1])
            if need_b:
                grad_b[v0:v1] = dlogits.sum(0, dtype=torch.float32)
            del dlogits, d  # free this tile before the next one exists
        return (None if grad_h is None else grad_h.to(hidden.dtype)), grad_w, grad_b, None, None, None


def linear_logprobs_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, temperature: float = 1.0, return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-prob of each label under ``softmax((hidden @ weight.T + bias) / temperature)``.

    ``hidden [..., H]``, ``weight [V, H]`` (the lm_head), ``labels [...]``, ``bias [V]`` optional.
    Returns ``logp [...]``, or ``(logp, entropy)`` with ``return_entropy=True``; both are 0 where the
    label is ``ignore_index``, and both are differentiable. ``chunk_size`` sets the tokens per chunk
    (default: ``chunk_plan``'s, by device). ``backend="fused"`` (or ``FASTALIGN_FUSED_HEAD=1``)
    runs the fused Triton lm_head instead (``fused_head.py``: logits never leave the chip); see
    ``head_choice`` for why it is not yet the default.
    """
    check_head_inputs(hidden, weight, labels, bias)
    if head_choice(hidden.device, backend)[0] == "fused":
        from .fused_head import fused_linear_logprobs

        return fused_linear_logprobs(hidden, weight, labels, bias, ignore_index, temperature,
                                     return_entropy=return_entropy)
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
