"""KL penalties per token: the log-prob difference in four forms, and the exact KL over the vocabulary.

With ``d = logp - logp_ref`` the log-prob of the sampled token under the policy minus that under
the reference model, the per-token penalty of each kind is (TRL 0.7.10's kinds, plus ``k3``):

    kl   = d
    abs  = |d|
    mse  = d^2 / 2
    k3   = e^{-d} - 1 + d        (Schulman's unbiased, non-negative estimator: r - 1 - log r, r = e^{-d})
    full = KL(p || q) = sum_v p_v (log p_v - log q_v)      over the whole vocabulary

``full`` takes rows of logits ``x`` (policy) and ``y`` (reference), ``[..., V]`` each, with
``p = softmax(x)``, ``q = softmax(y)``. Rows of log-probs work too: softmax of a normalised row is
itself, so the value is the same and so are the gradients with respect to the logits upstream.
Writing ``m_x = max x``, ``s_x = sum_v e^{x_v - m_x}`` (and ``m_y``, ``s_y`` alike),
``log p_v = (x_v - m_x) - log s_x`` and ``log q_v = (y_v - m_y) - log s_y``, so

    KL = sum_v p_v [(x_v - m_x) - (y_v - m_y)] - log s_x + log s_y
       = u / s_x - log s_x + log s_y,       u = sum_v e^{x_v - m_x} [(x_v - m_x) - (y_v - m_y)]

Everything is relative to the row maxima, so logits of 1e4 lose nothing to cancellation.
Online over vocabulary tiles: when a tile raises the maxima to ``m_x'``, ``m_y'``, every earlier
term of ``s_x`` is scaled by ``a = e^{m_x - m_x'}``, and every earlier bracket of ``u`` grows by the
constant ``c = (m_x - m_x') - (m_y - m_y')``, hence

    s_x' = a s_x + sum_tile e^{x - m_x'}                (s_y' alike, with e^{m_y - m_y'})
    u'   = a (u + c s_x) + sum_tile e^{x - m_x'} [(x - m_x') - (y - m_y')]

No softmax is kept: the forward pass stores ``(m_x, log s_x, m_y, log s_y, KL)`` per row. Backward,
with upstream gradient ``g`` per row,

    dKL/dx_v = p_v (log p_v - log q_v - KL)             dKL/dy_v = q_v - p_v

re-reading the logits tile by tile. Everything accumulates in fp32 whatever the input dtype.

PPO's reward shaping, built on these penalties, is ``shaping.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch, row_launch
from .logprobs import RowOptions, as_rows, make_options, row_chunks

KINDS = ("kl", "abs", "mse", "k3", "full")


# ----------------------------------------------------------------------------------------------
# Triton path for ``full``: one program per row, a loop over vocabulary tiles.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _full_kl_kernel(
    X, stride_xb, stride_xt, Y, stride_yb, stride_yt, T,
    NORM, KL, V,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + (row // T) * stride_xb + (row % T) * stride_xt
    y_row = Y + (row // T) * stride_yb + (row % T) * stride_yt

    # 1. Online over tiles: maxima m_x, m_y, sums s_x, s_y, and u = sum e^{x-m_x} ((x-m_x) - (y-m_y)),
    #    all re-referenced to the new maxima whenever a tile raises them.
    m_x = tl.full((), float("-inf"), tl.float32)
    m_y = tl.full((), float("-inf"), tl.float32)
    s_x = tl.zeros((), tl.float32)
    s_y = tl.zeros((), tl.float32)
    u = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        y = tl.load(y_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        mx_new = tl.maximum(m_x, tl.max(x, 0))
        my_new = tl.maximum(m_y, tl.max(y, 0))
        a_x = tl.exp(m_x - mx_new)
        e_x = tl.exp(x - mx_new)
        shift = tl.where(s_x > 0, (m_x - mx_new) - (m_y - my_new), 0.0)
        u = a_x * (u + shift * s_x) + tl.sum(tl.where(e_x > 0, e_x * ((x - mx_new) - (y - my_new)), 0.0), 0)
        s_x = s_x * a_x + tl.sum(e_x, 0)
        s_y = s_y * tl.exp(m_y - my_new) + tl.sum(tl.exp(y - my_new), 0)
        m_x = mx_new
        m_y = my_new

    # 2. KL = u / s_x - log s_x + log s_y; keep the two normalisers for backward.
    log_sx = tl.log(s_x)
    log_sy = tl.log(s_y)
    kl = u / s_x - log_sx + log_sy
    tl.store(NORM + 4 * row, m_x)
    tl.store(NORM + 4 * row + 1, log_sx)
    tl.store(NORM + 4 * row + 2, m_y)
    tl.store(NORM + 4 * row + 3, log_sy)
    tl.store(KL + row, kl)


@triton.jit
def _full_kl_grad_kernel(
    X, stride_xb, stride_xt, Y, stride_yb, stride_yt, T,
    DX, stride_dxb, stride_dxt, DY, stride_dyb, stride_dyt,
    NORM, KL, G, V,
    NEED_DX: tl.constexpr, NEED_DY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    x_row = X + b * stride_xb + t * stride_xt
    y_row = Y + b * stride_yb + t * stride_yt

    # 1. Per-row scalars saved by the forward pass, and the upstream gradient.
    m_x = tl.load(NORM + 4 * row)
    log_sx = tl.load(NORM + 4 * row + 1)
    m_y = tl.load(NORM + 4 * row + 2)
    log_sy = tl.load(NORM + 4 * row + 3)
    kl = tl.load(KL + row)
    g = tl.load(G + row)

    # 2. Re-read each tile, rebuild log p and log q, write both gradients in their inputs' dtypes.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
        logp = (x - m_x) - log_sx
        logq = (y - m_y) - log_sy
        p = tl.exp(logp)
        if NEED_DX:
            dx = tl.where(p > 0, g * p * (logp - logq - kl), 0.0)
            tl.store(DX + b * stride_dxb + t * stride_dxt + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DY:
            dy = g * (tl.exp(logq) - p)
            tl.store(DY + b * stride_dyb + t * stride_dyt + cols, dy.to(DY.dtype.element_ty), mask=mask)


def full_kl_launch(x3: torch.Tensor, y3: torch.Tensor, norm: torch.Tensor, kl: torch.Tensor) -> Launch:
    """The launch of ``_full_kl_kernel`` over ``x3``/``y3 [B, T, V]``: one program per row."""
    B, T, V = x3.shape
    return row_launch(
        _full_kl_kernel, B * T, V, (x3, x3.stride(0), x3.stride(1), y3, y3.stride(0), y3.stride(1), T, norm, kl, V)
    )


def full_kl_grad_launch(
    x3: torch.Tensor, y3: torch.Tensor, dx3: torch.Tensor | None, dy3: torch.Tensor | None,
    norm: torch.Tensor, kl: torch.Tensor, g: torch.Tensor,
) -> Launch:
    """The launch of ``_full_kl_grad_kernel``; a gradient not asked for gets the other's pointer
    and is not written."""
    B, T, V = x3.shape
    px = dx3 if dx3 is not None else dy3
    py = dy3 if dy3 is not None else dx3
    return row_launch(
        _full_kl_grad_kernel, B * T, V,
        (x3, x3.stride(0), x3.stride(1), y3, y3.stride(0), y3.stride(1), T,
         px, px.stride(0), px.stride(1), py, py.stride(0), py.stride(1), norm, kl, g, V),
        NEED_DX=dx3 is not None, NEED_DY=dy3 is not None,
    )


def _full_kl_stats_triton(x3, y3, opts):
    B, T, V = x3.shape
    norm = torch.empty(B, T, 4, dtype=torch.float32, device=x3.device)
    kl = torch.empty(B, T, dtype=torch.float32, device=x3.device)
    full_kl_launch(x3, y3, norm, kl)()
    return kl, norm


def _full_kl_grad_triton(x3, y3, dx3, dy3, norm, kl, g, opts):
    full_kl_grad_launch(x3, y3, dx3, dy3, norm, kl, g)()


# ----------------------------------------------------------------------------------------------
# Torch path for ``full``: chunks of rows, fp32 temporaries bounded like the row ops'.
# ----------------------------------------------------------------------------------------------


def _normaliser(z):
    """``(max, log sum e^{z - max})`` of each row of fp32 ``z``, kept apart as in the row kernels."""
    m = z.amax(dim=-1, keepdim=True)
    return m, (z - m).exp().sum(-1, keepdim=True).log()


def _full_kl_stats_torch(x3, y3, opts: RowOptions):
    B, T, _ = x3.shape
    norm = torch.empty(B, T, 4, dtype=torch.float32, device=x3.device)
    kl = torch.empty(B, T, dtype=torch.float32, device=x3.device)
    for b, s, e in row_chunks(x3, opts):
        z, w = x3[b, s:e].float(), y3[b, s:e].float()
        m_x, ls_x = _normaliser(z)
        m_y, ls_y = _normaliser(w)
        logp = (z - m_x).sub_(ls_x)  # out of place first: z is the input itself when it is fp32
        logq = (w - m_y).sub_(ls_y)
        p = logp.exp()
        kl[b, s:e] = torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)
        norm[b, s:e] = torch.cat([m_x, ls_x, m_y, ls_y], dim=-1)
    return kl, norm


def _full_kl_grad_torch(x3, y3, dx3, dy3, norm, kl, g, opts: RowOptions):
    for b, s, e in row_chunks(x3, opts):
        nm = norm[b, s:e]
        logp = (x3[b, s:e].float() - nm[:, 0:1]).sub_(nm[:, 1:2])  # never in place over the inputs
        logq = (y3[b, s:e].float() - nm[:, 2:3]).sub_(nm[:, 3:4])
        p = logp.exp()
        gr = g[b, s:e].unsqueeze(-1)
        if dx3 is not None:
            dx = (logp - logq).sub_(kl[b, s:e].unsqueeze(-1)).mul_(p).mul_(gr)
            dx3[b, s:e] = dx.masked_fill_(p == 0, 0.0)
        if dy3 is not None:
            dy3[b, s:e] = logq.exp_().sub_(p).mul_(gr)


# ----------------------------------------------------------------------------------------------
# Reference: plain fp32 torch, differentiable by autograd.
# ----------------------------------------------------------------------------------------------


def full_kl_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``sum_v p_v (log p_v - log q_v)`` with full fp32 log-softmaxes."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def kl_penalty_reference(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Each kind written out literally, in fp32."""
    if kind == "full":
        return full_kl_reference(logprob, ref_logprob)
    d = logprob.float() - ref_logprob.float()
    if kind == "kl":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d**2
    if kind == "k3":
        return torch.exp(-d) - 1 + d
    raise ValueError(f"unknown KL penalty kind {kind!r}; expected one of {KINDS}")


# ----------------------------------------------------------------------------------------------
# Autograd and the public ops.
# ----------------------------------------------------------------------------------------------


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, opts):
        x3, y3 = as_rows(logits), as_rows(ref_logits)
        stats = _full_kl_stats_triton if opts.backend == "triton" else _full_kl_stats_torch
        kl, norm = stats(x3, y3, opts)
        ctx.save_for_backward(logits, ref_logits, norm, kl)
        ctx.opts = opts
        return kl.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, norm, kl = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        x3, y3 = as_rows(logits), as_rows(ref_logits)
        dx = torch.empty(x3.shape, dtype=logits.dtype, device=logits.device) if need_x else None
        dy = torch.empty(y3.shape, dtype=ref_logits.dtype, device=ref_logits.device) if need_y else None
        g = grad_kl.reshape(kl.shape).float().contiguous()
        if need_x or need_y:
            grad = _full_kl_grad_triton if ctx.opts.backend == "triton" else _full_kl_grad_torch
            grad(x3, y3, dx, dy, norm, kl, g, ctx.opts)
        return (
            None if dx is None else dx.view(logits.shape),
            None if dy is None else dy.view(ref_logits.shape),
            None,
        )


def full_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, *, chunk_size: int | None = None, backend: str | None = None
) -> torch.Tensor:
    """fp32 ``KL(softmax(logits) || softmax(ref_logits))`` of each row ``[..., V] -> [...]``.

    Rows of logits or of log-probs, fp32/bf16/fp16; differentiable with respect to both (the
    gradients come back in each input's dtype). No ``[..., V]`` softmax is kept between passes.
    """
    if logits.dim() < 1 or logits.shape != ref_logits.shape:
        raise ValueError(
            f"full KL needs policy and reference rows of the same shape [..., V], got "
            f"{tuple(logits.shape)} and {tuple(ref_logits.shape)}"
        )
    opts = make_options(logits.device, -100, 1.0, chunk_size, backend)
    if opts.backend == "reference":
        return full_kl_reference(logits, ref_logits)
    return _FullKL.apply(logits, ref_logits, opts)


def _k3(d):
    """``e^{-d} - 1 + d`` accurate to fp32 for every ``d``.

    Near 0 the value is ``d^2 / 2`` while ``e^{-d} - 1`` and ``d`` cancel (even with expm1, a relative
    error of ``2 eps / |d|`` remains), so ``|d| < 0.1`` takes the Taylor series to ``d^6``
    (truncation below ``|d|^5 / 2520 < 4e-9`` relative).
    """
    s = d.clamp(-0.1, 0.1)  # the series branch only ever sees small arguments (finite gradients)
    series = s * s * (1 / 2 - s * (1 / 6 - s * (1 / 24 - s * (1 / 120 - s / 720))))
    return torch.where(d.abs() < 0.1, series, torch.expm1(-d) + d)


def kl_penalty(
    logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "kl", *, backend: str | None = None
) -> torch.Tensor:
    """Per-token KL penalty of ``kind`` (one of ``KINDS``, see the module docstring).

    ``kl``/``abs``/``mse``/``k3``: elementwise on per-token log-probs of any matching shape, in their
    dtype (plain torch on every device; autograd gives the gradients). ``full``: rows of logits
    ``[..., V]`` of policy and reference, the exact KL over the vocabulary, fp32 ``[...]``, fused
    (Triton on CUDA, chunked torch elsewhere).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown KL penalty kind {kind!r}; expected one of {KINDS}")
    if kind == "full":
        return full_kl(logprob, ref_logprob, backend=backend)
    if logprob.shape != ref_logprob.shape:
        raise ValueError(
            f"logprob {tuple(logprob.shape)} and ref_logprob {tuple(ref_logprob.shape)} must have the same shape"
        )
    d = logprob - ref_logprob
    if kind == "kl":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d.square()
    return _k3(d)

