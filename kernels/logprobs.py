"""Row-wise softmax statistics: token log-probs and entropy, without a log-softmax kept alive.

For a row of logits ``x`` over a vocabulary of ``V`` entries, temperature ``T`` and label ``y``:

    z_j     = x_j / T
    m       = max_j z_j,   s = sum_j e^{z_j - m},   t = sum_j e^{z_j - m} (z_j - m)   (online over tiles)
    log p_j = (z_j - m) - log s
    logp    = log p_y                                   (0 where y == ignore_index)
    H       = -sum_j p_j log p_j = log s - t / s

Backward, with upstream gradients ``g`` (of logp) and ``g_H`` (of H), p = softmax(z):

    dL/dx_j = (1/T) * ( g * ([j == y] - p_j)  -  g_H * p_j * (log p_j + H) )

Only the normaliser ``(m, log s)`` (and ``H``) per row is kept between forward and backward;
backward re-reads the logits, which the caller holds anyway. ``m`` and ``log s`` are kept apart
rather than summed into one log-sum-exp: at logits near 1e4 the sum rounds to 1e-3 in fp32, while
``z - m`` stays exact. Everything accumulates in fp32 whatever the input dtype.

The Triton path works in base 2 with the temperature hoisted: it keeps the raw logits' max
``m_x = max_j x_j`` (so ``m = m_x / T``) and computes ``e^{z_j - m} = 2^{(x_j - m_x) log2(e) / T}``,
one subtract and one multiply per element. Its ``norm`` holds ``(m_x, log s)``, the torch path's
``(m, log s)``: each path's ``row_grad`` reads back what its own ``row_stats`` wrote.

Public ops: ``selective_logprobs`` (the log-prob of each label) and ``entropy_from_logits``.
``row_stats`` / ``row_grad`` are the building blocks ``linear_logprobs`` reuses per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._dispatch import resolve_backend
from ._launch import Launch, row_launch

# Torch path: rows per chunk so that one chunk's fp32 temporaries stay within this many bytes.
CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class RowOptions:
    """The knobs shared by every row op, all scalars (they reach kernels as runtime arguments).

    - ``ignore_index``: the label that takes no log-prob (its row gives 0)
    - ``temperature``: the logits are divided by it, > 0
    - ``backend``: the resolved path, ``"triton"``, ``"torch"`` or ``"reference"``
    - ``chunk_size``: rows per chunk on the torch path; None derives it from ``CHUNK_BYTES``
    """

    ignore_index: int = -100
    temperature: float = 1.0
    backend: str = "torch"
    chunk_size: int | None = None

    def rows_per_chunk(self, vocab: int) -> int:
        """Rows of ``vocab`` logits per torch-path chunk: ``chunk_size``, or ``CHUNK_BYTES`` of fp32."""
        return self.chunk_size or max(1, CHUNK_BYTES // (4 * vocab))


def make_options(
    device: torch.device, ignore_index: int, temperature: float, chunk_size: int | None, backend: str | None
) -> RowOptions:
    """The checked ``RowOptions`` of one call, its path resolved for ``device``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return RowOptions(int(ignore_index), float(temperature), resolve_backend(device, backend), chunk_size)


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is a vocabulary id or ``ignore_index``; name the first that is not."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels{list(where)} = {int(labels[where])} is not a vocabulary id in [0, {vocab}) "
            f"nor ignore_index ({ignore_index})"
        )


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A ``[B, T, V]`` view of ``[..., V]`` logits with a unit vocabulary stride (copies only if needed)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x if x.dim() == 3 else x.flatten(0, -3)


# ----------------------------------------------------------------------------------------------
# Triton path: one program per row, a loop over vocabulary tiles.
#
# In base 2 with the temperature hoisted: with m_x = max_j x_j (the raw logits' max) and
# k = log2(e) / T, every exponential is e^{z_j - m} = 2^{(x_j - m_x) k}: one subtraction and one
# multiply per element, no division (the subtraction first keeps x_j - m_x exact for logits near
# the max, even at |x| ~ 1e4). Logs come back to base e at the end: log s = log2(s) ln 2.
# The Triton path's normaliser holds (m_x, log s), the raw max: row_grad reads it back the same way.
# ----------------------------------------------------------------------------------------------

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_stats_kernel(
    X, stride_xb, stride_xt, T,
    LABELS, LOGP, NORM, ENT,
    V, temperature, ignore_index,
    HAS_LABELS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + (row // T) * stride_xb + (row % T) * stride_xt
    inv_temp = 1.0 / temperature
    k = inv_temp * LOG2E  # hoisted: 2^{(x - m_x) k} = e^{(x - m_x) / T}

    # 1. Online log-sum-exp over vocabulary tiles, in raw units: running max m of x,
    #    s = sum 2^{(x-m)k}, and for the entropy t = sum 2^{(x-m)k} (x-m); rescaled when m grows.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp2((m - m_new) * k)
        d = x - m_new
        e = tl.exp2(d * k)
        if WITH_ENTROPY:
            shift = tl.where(s > 0, m - m_new, 0.0) * s
            t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0, d, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    log_s = tl.log2(s) * LN2
    tl.store(NORM + 2 * row, m)
    tl.store(NORM + 2 * row + 1, log_s)

    # 2. The label's log-prob, (x_y - m) / T - log s: one scalar load of its logit.
    valid = True
    if HAS_LABELS:
        y = tl.load(LABELS + row)
        valid = y != ignore_index
        x_y = tl.load(x_row + y, mask=valid, other=0.0).to(tl.float32)
        tl.store(LOGP + row, tl.where(valid, (x_y - m) * inv_temp - log_s, 0.0))

    # 3. Entropy from the same pass: H = log s - t / (T s) (0 on ignored rows).
    if WITH_ENTROPY:
        tl.store(ENT + row, tl.where(valid, log_s - t * inv_temp / s, 0.0))


@triton.jit
def _row_grad_kernel(
    X, stride_xb, stride_xt, T,
    DX, stride_db, stride_dt,
    LABELS, NORM, ENT, G_LOGP, G_ENT,
    V, col0, temperature, ignore_index,
    HAS_LABELS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # The row's V columns are vocabulary ids col0 .. col0 + V - 1 (a tile of the vocabulary).
    row = tl.program_id(0).to(tl.int64)
    x_row = X + (row // T) * stride_xb + (row % T) * stride_xt
    dx_row = DX + (row // T) * stride_db + (row % T) * stride_dt

    # 1. Per-row scalars, hoisted: k = log2(e) / T and log2 s, so log2 p = (x - m) k - log2 s.
    #    1/T is folded into the upstream gradients, ignored rows get zero; the entropy term
    #    g_H p (log p + H) is g_H ln2 * p * (log2 p + H log2 e).
    m = tl.load(NORM + 2 * row)
    inv_temp = 1.0 / temperature
    k = inv_temp * LOG2E
    log2_s = tl.load(NORM + 2 * row + 1) * LOG2E
    g = tl.zeros((), tl.float32)
    y = -1
    valid = True
    if HAS_LABELS:
        y = tl.load(LABELS + row)
        valid = y != ignore_index
        g = tl.where(valid, tl.load(G_LOGP + row), 0.0) * inv_temp
    if WITH_ENTROPY:
        g_ent2 = tl.where(valid, tl.load(G_ENT + row), 0.0) * (inv_temp * LN2)
        ent2 = tl.load(ENT + row) * LOG2E

    # 2. Re-read each tile, rebuild p, write the gradient in the output's dtype.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        log2_p = (x - m) * k - log2_s
        p = tl.exp2(log2_p)
        dz = -g * p
        if WITH_ENTROPY:
            dz -= tl.where(p > 0, g_ent2 * p * (log2_p + ent2), 0.0)
        if HAS_LABELS:
            dz = tl.where(cols + col0 == y, dz + g, dz)
        tl.store(dx_row + cols, dz.to(DX.dtype.element_ty), mask=mask)


def row_stats_launch(
    x3: torch.Tensor, labels: torch.Tensor | None, logp: torch.Tensor | None, norm: torch.Tensor,
    ent: torch.Tensor | None, opts: RowOptions,
) -> Launch:
    """The launch of ``_row_stats_kernel`` over ``x3 [B, T, V]``: one program per row."""
    B, T, V = x3.shape
    return row_launch(
        _row_stats_kernel, B * T, V,
        (x3, x3.stride(0), x3.stride(1), T,
         labels if labels is not None else norm, logp if logp is not None else norm, norm,
         ent if ent is not None else norm, V, opts.temperature, opts.ignore_index),
        HAS_LABELS=labels is not None, WITH_ENTROPY=ent is not None,
    )


def row_grad_launch(
    x3: torch.Tensor, out3: torch.Tensor, labels: torch.Tensor | None, norm: torch.Tensor,
    ent: torch.Tensor | None, g_logp: torch.Tensor | None, g_ent: torch.Tensor | None, opts: RowOptions,
    col0: int = 0,
) -> Launch:
    """The launch of ``_row_grad_kernel``: ``out3`` gets dL/dx of ``x3 [B, T, V]``, one program per row."""
    B, T, V = x3.shape
    return row_launch(
        _row_grad_kernel, B * T, V,
        (x3, x3.stride(0), x3.stride(1), T, out3, out3.stride(0), out3.stride(1),
         labels if labels is not None else norm, norm, ent if g_ent is not None else norm,
         g_logp if g_logp is not None else norm, g_ent if g_ent is not None else norm,
         V, col0, opts.temperature, opts.ignore_index),
        HAS_LABELS=labels is not None, WITH_ENTROPY=g_ent is not None,
    )


def _row_stats_triton(x3, labels, opts, with_entropy):
    B, T, V = x3.shape
    norm = torch.empty(B, T, 2, dtype=torch.float32, device=x3.device)
    logp = torch.empty(B, T, dtype=torch.float32, device=x3.device) if labels is not None else None
    ent = torch.empty(B, T, dtype=torch.float32, device=x3.device) if with_entropy else None
    row_stats_launch(x3, labels, logp, norm, ent, opts)()
    return logp, norm, ent


def _row_grad_triton(x3, out3, labels, norm, ent, g_logp, g_ent, opts, col0):
    row_grad_launch(x3, out3, labels, norm, ent, g_logp, g_ent, opts, col0)()


# ----------------------------------------------------------------------------------------------
# Torch path: chunks of rows, fp32 temporaries bounded by CHUNK_BYTES.
# ----------------------------------------------------------------------------------------------


def row_chunks(x3: torch.Tensor, opts: RowOptions) -> Iterator[tuple[int, int, int]]:
    """``(b, start, end)`` over every row of ``x3 [B, T, V]``, ``opts.rows_per_chunk`` rows at a time."""
    B, T, V = x3.shape
    step = opts.rows_per_chunk(V)
    for b in range(B):
        for start in range(0, T, step):
            yield b, start, min(start + step, T)


def _row_stats_torch(x3, labels, opts, with_entropy):
    B, T, _ = x3.shape
    norm = torch.empty(B, T, 2, dtype=torch.float32, device=x3.device)
    logp = torch.empty(B, T, dtype=torch.float32, device=x3.device) if labels is not None else None
    ent = torch.empty(B, T, dtype=torch.float32, device=x3.device) if with_entropy else None
    for b, s, e in row_chunks(x3, opts):
        z = x3[b, s:e].float()
        if opts.temperature != 1.0:
            z = z / opts.temperature
        m = z.amax(dim=-1, keepdim=True)
        z_m = z - m
        valid = picked = None
        if labels is not None:
            y = labels[b, s:e]
            valid = y != opts.ignore_index
            picked = z_m.gather(-1, torch.where(valid, y, 0).unsqueeze(-1))[:, 0]
        e_z = z_m.exp() if with_entropy else z_m.exp_()  # z_m is still needed for the entropy
        log_s = e_z.sum(-1, keepdim=True).log()
        norm[b, s:e, 0], norm[b, s:e, 1] = m[:, 0], log_s[:, 0]
        if labels is not None:
            logp[b, s:e] = torch.where(valid, picked - log_s[:, 0], 0.0)
        if with_entropy:
            logq = z_m.sub_(log_s)
            p = logq.exp()
            h = -torch.where(p > 0, p * logq, 0.0).sum(-1)
            ent[b, s:e] = h if valid is None else torch.where(valid, h, 0.0)
    return logp, norm, ent


def _row_grad_torch(x3, out3, labels, norm, ent, g_logp, g_ent, opts, col0):
    # Work in out3 itself when it is fp32 (in place over x3, or a fresh fp32 gradient), else in a
    # chunk-sized fp32 buffer copied out at the end.
    direct = out3.dtype == torch.float32
    inv_temp = 1.0 / opts.temperature
    for b, s, e in row_chunks(x3, opts):
        x = x3[b, s:e]
        buf = out3[b, s:e] if direct else torch.empty(x.shape, dtype=torch.float32, device=x.device)
        if x.dtype == torch.float32 and opts.temperature == 1.0:
            torch.sub(x, norm[b, s:e, 0:1], out=buf)  # one pass: read x, write buf
        else:
            if buf.data_ptr() != x.data_ptr():
                buf.copy_(x)  # upcast first: z = x / T is computed in fp32, as in the forward
            buf.div_(opts.temperature).sub_(norm[b, s:e, 0:1])
        buf.sub_(norm[b, s:e, 1:2])  # buf = log p = (z - m) - log s
        valid = labels[b, s:e] != opts.ignore_index if labels is not None else None
        # 1/T folded into the upstream gradients; ignored rows get none.
        g = torch.zeros_like(norm[b, s:e, 0]) if g_logp is None else g_logp[b, s:e] * inv_temp
        if valid is not None:
            g = torch.where(valid, g, 0.0)
        if g_ent is not None:
            ge = g_ent[b, s:e] * inv_temp
            if valid is not None:
                ge = torch.where(valid, ge, 0.0)
            p = buf.exp()
            # dz = -p * (g + g_H * (log p + H)), zero where p underflows to 0
            buf.add_(ent[b, s:e].unsqueeze(-1)).mul_(ge.unsqueeze(-1)).add_(g.unsqueeze(-1)).mul_(p).neg_()
            buf.masked_fill_(p == 0, 0.0)
        else:
            buf.exp_().mul_(-g.unsqueeze(-1))
        if labels is not None:
            y = labels[b, s:e] - col0
            here = valid & (y >= 0) & (y < buf.shape[-1])
            buf.scatter_add_(-1, torch.where(here, y, 0).unsqueeze(-1), torch.where(here, g, 0.0).unsqueeze(-1))
        if not direct:
            out3[b, s:e] = buf


def row_stats(
    x3: torch.Tensor, labels: torch.Tensor | None, opts: RowOptions, with_entropy: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """fp32 ``(logp, norm, entropy)`` of every row of ``x3 [B, T, V]``.

    ``norm [B, T, 2]`` holds each row's ``(max, log-sum-exp below the max)``, what ``row_grad``
    needs; ``logp`` is None without labels, ``entropy`` None unless asked.
    """
    fn = _row_stats_triton if opts.backend == "triton" else _row_stats_torch
    return fn(x3, labels, opts, with_entropy)


def row_grad(
    x3: torch.Tensor, out3: torch.Tensor, labels: torch.Tensor | None, norm: torch.Tensor, ent: torch.Tensor | None,
    g_logp: torch.Tensor | None, g_ent: torch.Tensor | None, opts: RowOptions, col0: int = 0,
) -> None:
    """Write dL/dx for ``x3`` into ``out3`` (which may be ``x3`` itself when it is fp32).

    ``x3`` may be a tile of the vocabulary: its columns are ids ``col0 .. col0 + x3.shape[-1] - 1``,
    and ``norm``/``ent`` are those of the whole rows.
    """
    fn = _row_grad_triton if opts.backend == "triton" else _row_grad_torch
    fn(x3, out3, labels, norm, ent, g_logp, g_ent, opts, col0)


# ----------------------------------------------------------------------------------------------
# Reference: plain fp32 torch, differentiable by autograd, obviously correct.
# ----------------------------------------------------------------------------------------------


def selective_logprobs_reference(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, temperature: float = 1.0
) -> torch.Tensor:
    """Plain fp32: the full log-softmax, then the label's entry (0 where ignored)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = labels != ignore_index
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)


def entropy_from_logits_reference(logits: torch.Tensor) -> torch.Tensor:
    """Plain fp32: ``-sum p log p`` over the full log-softmax."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------------------------
# Autograd and the public ops.
# ----------------------------------------------------------------------------------------------


class _SelectiveLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, opts):
        x3 = as_rows(logits)
        y3 = labels.reshape(x3.shape[:2]).long()
        logp, norm, _ = row_stats(x3, y3, opts, with_entropy=False)
        ctx.save_for_backward(logits, y3, norm)
        ctx.opts = opts
        return logp.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logp):
        logits, y3, norm = ctx.saved_tensors
        x3 = as_rows(logits)
        grad = torch.empty(x3.shape, dtype=logits.dtype, device=logits.device)
        g = grad_logp.reshape(y3.shape).float().contiguous()
        row_grad(x3, grad, y3, norm, None, g, None, ctx.opts)
        return grad.view(logits.shape), None, None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, opts):
        x3 = as_rows(logits)
        _, norm, ent = row_stats(x3, None, opts, with_entropy=True)
        ctx.save_for_backward(logits, norm, ent)
        ctx.opts = opts
        return ent.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_ent):
        logits, norm, ent = ctx.saved_tensors
        x3 = as_rows(logits)
        grad = torch.empty(x3.shape, dtype=logits.dtype, device=logits.device)
        g = grad_ent.reshape(ent.shape).float().contiguous()
        row_grad(x3, grad, None, norm, ent, None, g, ctx.opts)
        return grad.view(logits.shape), None


def selective_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, temperature: float = 1.0, *,
    chunk_size: int | None = None, backend: str | None = None,
) -> torch.Tensor:
    """fp32 log-prob of each label under ``softmax(logits / temperature)``; 0 where ignored.

    ``logits [..., V]`` in fp32/bf16/fp16, ``labels [...]`` integer. The backward pass rebuilds the
    softmax from the saved per-row log-sum-exp instead of keeping a ``[..., V]`` log-softmax.
    """
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} minus the vocabulary dim")
    opts = make_options(logits.device, ignore_index, temperature, chunk_size, backend)
    check_labels(labels, logits.shape[-1], opts.ignore_index)
    if opts.backend == "reference":
        return selective_logprobs_reference(logits, labels, ignore_index, temperature)
    return _SelectiveLogprobs.apply(logits, labels, opts)


def entropy_from_logits(
    logits: torch.Tensor, *, chunk_size: int | None = None, backend: str | None = None
) -> torch.Tensor:
    """fp32 entropy of ``softmax(logits)`` over the last dim, computed in chunks; differentiable."""
    opts = make_options(logits.device, -100, 1.0, chunk_size, backend)
    if opts.backend == "reference":
        return entropy_from_logits_reference(logits)
    return _Entropy.apply(logits, opts)
