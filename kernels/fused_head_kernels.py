"""The Triton kernels of the fused lm_head: logits tiles built and reduced on chip, never stored.

``fused_head.py`` plans their grids and runs them; see it for the op and its options. Math:

    logits = hidden @ weight.T + bias           hidden [N, H], weight [V, H], bias [V]
    logp_i = log softmax(logits_i / T)[y_i]     (0 where y_i == ignore_index)
    H_i    = entropy of softmax(logits_i / T)   (optional, 0 where ignored)

The lm_head matmul is ``tl.dot`` tiles inside the kernel, with the online log-sum-exp of Milakov &
Gimelshein (2018, "Online normalizer calculation for softmax") in the same loop, as in Cut
Cross-Entropy (Wijmans et al., 2024) and Liger's fused linear losses.

Everything runs in base 2 with the scale hoisted: ``u = (x · w + b) * log2(e) / T``, so that
``p_j = 2^(u_j - M - L)`` with, per token,

    M = max_j u_j,   L = log2 sum_j 2^(u_j - M),   t = sum_j 2^(u_j - M) (u_j - M)
    logp = ln2 * (u_y - M - L),      H = ln2 * (L - t / 2^L)

``(M, L)`` are kept apart (not summed into one log-sum-exp): at logits of 1e4 the sum would round
to 1e-3 in fp32 where ``u - M`` stays exact.

Forward (``_fwd_kernel``). Grid ``(cdiv(N, BLOCK_N), SPLIT)``: a program takes ``BLOCK_N`` tokens
and one of ``SPLIT`` equal ranges of the vocabulary (whole tiles). For each ``BLOCK_V``-wide tile
of its range it builds the ``[BLOCK_N, BLOCK_V]`` logits with ``tl.dot`` over ``H`` in
``BLOCK_H`` slices (input-dtype operands, fp32 accumulator), then folds the tile into the online
``(M, s, t)``. The label's ``u_y`` comes from a row-wise product of the hidden row and the label's
weight row, taken by the range that holds the label (picking it out of each tile by comparing
every column with the label cost about 120 registers a thread on sm_90). It writes those four
numbers per token and split; ``_combine_kernel`` merges the splits into ``logp``, ``(M, L)`` and
``H``. The logits never reach HBM; the forward's memory is 16 bytes per token and split.

Backward, with upstream gradients ``g`` (of logp) and ``g_H`` (of H):

    dL/dlogits_j = (1/T) * ( g * ([j == y] - p_j)  -  g_H * p_j * (log p_j + H) )
    grad_hidden = dlogits @ weight      grad_weight = dlogits.T @ hidden      grad_bias = sum_i dlogits_i

Both backward kernels recompute a logits tile exactly as the forward did and turn it in registers
into ``dlogits`` (``_dlogits_tile``):

* ``_dlogits_kernel``, grid ``(cdiv(N, BLOCK_N), cdiv(Vc, BLOCK_V))`` over one vocabulary chunk of
  ``Vc`` columns, stores the chunk's ``dlogits`` in the input dtype for the two gradient matmuls
  that follow it (``"dlogits"`` scheme).
* ``_atomic_bwd_kernel``, grid ``(cdiv(N, BLOCK_N), cdiv(V, BLOCK_V))``, then makes a second pass
  over ``H`` in ``BLOCK_HG`` slices and adds ``tl.dot(dlogits, W_tile)`` into ``grad_hidden`` and
  ``tl.dot(dlogits.T, hidden_block)`` into ``grad_weight`` with fp32 atomics (``"atomic"`` scheme).

Both sum ``grad_bias`` over token blocks with fp32 atomics into a ``[V]`` buffer.

The interpreter (``TRITON_INTERPRET=1``, the CPU test path): ``tl.dot`` on bf16 operands returns
garbage there (DESIGN.md), so under it the kernels upcast both operands to fp32 before each dot
(the ``UPCAST`` constexpr, set from the interpreter flag); on a GPU the operands stay in the input
dtype (bf16/fp16 ``tl.dot`` -> wgmma on sm_90, mma on sm_80). fp32 inputs use ``ieee`` dots (no
tf32), to match the fp32 reference; that is a correctness path, not a fast one.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Every kernel sees hidden [N, H] and weight [V, H] with a unit stride along H.


@triton.jit
def _logits_tile(
    HID, W, stride_hn, stride_wv, rows, cols, N, V, H,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """fp32 ``hidden[rows] @ weight[cols].T`` (0 outside N and V), a ``[BLOCK_N, BLOCK_V]`` tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_ptr = HID + rows.to(tl.int64)[:, None] * stride_hn
    w_ptr = W + cols.to(tl.int64)[:, None] * stride_wv
    rmask = rows[:, None] < N
    cmask = cols[:, None] < V
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks[None, :] < H
        a = tl.load(h_ptr + ks[None, :], mask=rmask & kmask, other=0.0)  # [BLOCK_N, BLOCK_H]
        b = tl.load(w_ptr + ks[None, :], mask=cmask & kmask, other=0.0)  # [BLOCK_V, BLOCK_H]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _label_logit(
    HID, W, BIAS, stride_hn, stride_wv, rows, y, take, H,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """fp32 ``hidden[rows] . weight[y] + bias[y]`` where ``take``, else 0: the label's logit."""
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    h_ptr = HID + rows.to(tl.int64)[:, None] * stride_hn
    w_ptr = W + tl.where(take, y, 0).to(tl.int64)[:, None] * stride_wv
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        mask = take[:, None] & (ks[None, :] < H)
        a = tl.load(h_ptr + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(w_ptr + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += a * b
    z = tl.sum(acc, 1)
    if HAS_BIAS:
        z += tl.load(BIAS + y, mask=take, other=0.0).to(tl.float32)
    return z


@triton.jit
def _fwd_kernel(
    HID, W, BIAS, LABELS, PART,
    N, V, H, stride_hn, stride_wv, v_per_split, scale, ignore_index,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # PART [SPLIT, N, 4]: per token and vocabulary range (M, s, t, u_y) in base 2, see the docstring.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    lo = split * v_per_split
    hi = tl.minimum(lo + v_per_split, V)

    # 1. Online log-sum-exp over the range's vocabulary tiles, in base 2: running max m,
    #    s = sum 2^(u - m), t = sum 2^(u - m) (u - m), rescaled whenever m grows.
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < hi
        # 1a. The logits tile on chip: tl.dot over H slices, fp32 accumulation.
        acc = _logits_tile(
            HID, W, stride_hn, stride_wv, rows, cols, N, V, H, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H
        )
        # 1b. Base-2 scaled logits in one FMA: u = acc * scale + c, with c = bias * scale, and a
        #     large finite negative past the range (finite, so that e * (u - m) stays 0 there).
        if HAS_BIAS:
            c = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32) * scale
        else:
            c = tl.zeros((BLOCK_V,), tl.float32)
        u = acc * scale + tl.where(cmask, c, -1.0e30)[None, :]
        # 1c. Fold the tile into the running statistics.
        m_new = tl.maximum(m, tl.max(u, 1))
        alpha = tl.exp2(m - m_new)
        d = u - m_new[:, None]
        e = tl.exp2(d)
        if WITH_ENTROPY:
            shift = tl.where(s > 0, m - m_new, 0.0) * s
            t = alpha * (t + shift) + tl.sum(e * d, 1)
        s = s * alpha + tl.sum(e, 1)
        m = m_new

    # 2. The label's scaled logit, from the one range that holds the label.
    y = tl.load(LABELS + rows, mask=rmask, other=ignore_index)
    take = rmask & (y != ignore_index) & (y >= lo) & (y < hi)
    u_y = _label_logit(HID, W, BIAS, stride_hn, stride_wv, rows, y, take, H, HAS_BIAS, BLOCK_N, BLOCK_H) * scale

    # 3. This range's partial statistics.
    out = PART + (split * N + rows).to(tl.int64) * 4
    tl.store(out, m, mask=rmask)
    tl.store(out + 1, s, mask=rmask)
    tl.store(out + 2, t, mask=rmask)
    tl.store(out + 3, u_y, mask=rmask)


@triton.jit
def _combine_kernel(
    PART, LABELS, LOGP, NORM, ENT, N, n_split, ignore_index,
    WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N

    # 1. The global max over the ranges.
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for k in range(n_split):
        m = tl.maximum(m, tl.load(PART + (k * N + rows).to(tl.int64) * 4, mask=rmask, other=0.0))

    # 2. s, t and u_y summed over the ranges, each s and t moved to the common max.
    s = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    u_y = tl.zeros((BLOCK,), tl.float32)
    for k in range(n_split):
        part = PART + (k * N + rows).to(tl.int64) * 4
        m_k = tl.load(part, mask=rmask, other=0.0)
        s_k = tl.load(part + 1, mask=rmask, other=1.0)  # rows past N: harmless, no log2(0)
        has = s_k > 0
        d = tl.where(has, m_k - m, 0.0)
        w = tl.where(has, tl.exp2(d), 0.0)
        s += s_k * w
        if WITH_ENTROPY:
            t += w * (tl.load(part + 2, mask=rmask, other=0.0) + s_k * d)
        u_y += tl.load(part + 3, mask=rmask, other=0.0)
    log_s = tl.log2(s)

    # 3. logp and H back in natural log; (M, L) stay in base 2 for the backward.
    y = tl.load(LABELS + rows, mask=rmask, other=ignore_index)
    valid = y != ignore_index
    tl.store(LOGP + rows, tl.where(valid, (u_y - m - log_s) * 0.6931471805599453, 0.0), mask=rmask)
    tl.store(NORM + 2 * rows, m, mask=rmask)
    tl.store(NORM + 2 * rows + 1, log_s, mask=rmask)
    if WITH_ENTROPY:
        tl.store(ENT + rows, tl.where(valid, (log_s - t / s) * 0.6931471805599453, 0.0), mask=rmask)


@triton.jit
def _dlogits_tile(
    HID, W, BIAS, LABELS, NORM, ENT, G_LOGP, G_ENT, rows, cols,
    N, V, H, stride_hn, stride_wv, scale, ignore_index,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """fp32 ``dL/dlogits`` of a ``[BLOCK_N, BLOCK_V]`` tile, 0 outside N and V and on ignored rows."""
    rmask = rows < N
    cmask = cols < V
    # 1. Per-token scalars; 1/T folded into the upstream gradients, ignored rows get zero.
    inv_temp = scale * 0.6931471805599453
    y = tl.load(LABELS + rows, mask=rmask, other=ignore_index)
    valid = y != ignore_index
    m = tl.load(NORM + 2 * rows, mask=rmask, other=0.0)
    log_s = tl.load(NORM + 2 * rows + 1, mask=rmask, other=0.0)
    g = tl.where(valid, tl.load(G_LOGP + rows, mask=rmask, other=0.0), 0.0) * inv_temp

    # 2. Recompute the logits tile exactly as the forward did, and p = 2^(u - M - L).
    acc = _logits_tile(
        HID, W, stride_hn, stride_wv, rows, cols, N, V, H, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H
    )
    #    Bit for bit the forward's u (same BLOCK_H, same FMA): at logits of 1e4 an ulp of u is
    #    1e-3, and p = 2^(u - M - L) of the top token must come out exactly 1 as it did there.
    if HAS_BIAS:
        c = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32) * scale
        u = acc * scale + c[None, :]
    else:
        u = acc * scale
    log2p = u - m[:, None] - log_s[:, None]
    p = tl.exp2(log2p)

    # 3. dlogits = (1/T) (g ([j == y] - p) - g_H p (log p + H)).
    dz = -g[:, None] * p
    if WITH_ENTROPY:
        g_ent = tl.where(valid, tl.load(G_ENT + rows, mask=rmask, other=0.0), 0.0) * inv_temp
        ent = tl.load(ENT + rows, mask=rmask, other=0.0)
        dz -= g_ent[:, None] * p * (log2p * 0.6931471805599453 + ent[:, None])
    dz = tl.where(cols[None, :] == y[:, None], dz + g[:, None], dz)
    return tl.where(rmask[:, None] & cmask[None, :], dz, 0.0)


@triton.jit
def _dlogits_kernel(
    HID, W, BIAS, LABELS, NORM, ENT, G_LOGP, G_ENT, DZ, GRAD_BIAS,
    N, V, H, stride_hn, stride_wv, stride_dz, col0, scale, ignore_index,
    HAS_BIAS: tl.constexpr, NEED_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # DZ [N, Vc]: columns col0 .. col0 + Vc - 1 of dlogits, in the input dtype. V is the chunk's end.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col0 + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)

    # 1. dlogits of the tile, in registers.
    dz = _dlogits_tile(
        HID, W, BIAS, LABELS, NORM, ENT, G_LOGP, G_ENT, rows, cols,
        N, V, H, stride_hn, stride_wv, scale, ignore_index,
        HAS_BIAS, WITH_ENTROPY, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
    )

    # 2. Store it for the gradient matmuls; the bias gradient sums the tile's rows now, in fp32.
    mask = (rows[:, None] < N) & (cols[None, :] < V)
    ptr = DZ + rows.to(tl.int64)[:, None] * stride_dz + (cols - col0)[None, :]
    tl.store(ptr, dz.to(DZ.dtype.element_ty), mask=mask)
    if NEED_BIAS:
        tl.atomic_add(GRAD_BIAS + cols, tl.sum(dz, 0), mask=cols < V)


@triton.jit
def _atomic_bwd_kernel(
    HID, W, BIAS, LABELS, NORM, ENT, G_LOGP, G_ENT, GRAD_H, GRAD_W, GRAD_BIAS,
    N, V, H, stride_hn, stride_wv, scale, ignore_index,
    HAS_BIAS: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HG: tl.constexpr,
):
    # GRAD_H [N, H], GRAD_W [V, H], GRAD_BIAS [V]: fp32, zeroed, contiguous.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = cols < V

    # 1. dlogits of the tile, in registers, as the operand dtype of the gradient dots.
    dz = _dlogits_tile(
        HID, W, BIAS, LABELS, NORM, ENT, G_LOGP, G_ENT, rows, cols,
        N, V, H, stride_hn, stride_wv, scale, ignore_index,
        HAS_BIAS, WITH_ENTROPY, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
    )
    if NEED_BIAS:
        tl.atomic_add(GRAD_BIAS + cols, tl.sum(dz, 0), mask=cmask)
    if UPCAST:
        d = dz
    else:
        d = dz.to(W.dtype.element_ty)

    # 2. Second pass over H: this tile's share of grad_hidden and grad_weight, added atomically.
    h_ptr = HID + rows.to(tl.int64)[:, None] * stride_hn
    w_ptr = W + cols.to(tl.int64)[:, None] * stride_wv
    for k0 in range(0, H, BLOCK_HG):
        ks = k0 + tl.arange(0, BLOCK_HG)
        kmask = ks[None, :] < H
        if NEED_H:
            b = tl.load(w_ptr + ks[None, :], mask=cmask[:, None] & kmask, other=0.0)  # [BLOCK_V, BLOCK_HG]
            if UPCAST:
                b = b.to(tl.float32)
            gh = tl.dot(d, b, input_precision=PRECISION)  # [BLOCK_N, BLOCK_HG]
            tl.atomic_add(GRAD_H + rows.to(tl.int64)[:, None] * H + ks[None, :], gh, mask=rmask[:, None] & kmask)
        if NEED_W:
            a = tl.load(h_ptr + ks[None, :], mask=rmask[:, None] & kmask, other=0.0)  # [BLOCK_N, BLOCK_HG]
            if UPCAST:
                a = a.to(tl.float32)
            gw = tl.dot(tl.trans(d), a, input_precision=PRECISION)  # [BLOCK_V, BLOCK_HG]
            tl.atomic_add(GRAD_W + cols.to(tl.int64)[:, None] * H + ks[None, :], gw, mask=cmask[:, None] & kmask)
