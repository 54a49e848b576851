"""The fused lm_head in Triton: token log-probs (and entropy) from hidden states, logits kept on chip.

    logits = hidden @ weight.T + bias           hidden [N, H], weight [V, H], bias [V]
    logp_i = log softmax(logits_i / T)[y_i]     (0 where y_i == ignore_index)
    H_i    = entropy of softmax(logits_i / T)   (optional, 0 where ignored)

Same op as ``linear_logprobs`` (and checked against its ``linear_logprobs_reference``); here the
lm_head matmul itself is ``tl.dot`` tiles inside the kernel, with the online log-sum-exp of
Milakov & Gimelshein (2018, "Online normalizer calculation for softmax") in the same loop, as in
Cut Cross-Entropy (Wijmans et al., 2024) and Liger's fused linear losses.

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
numbers per token and split; a small combine kernel (``_combine_kernel``) merges the splits into ``logp``, ``(M, L)`` and ``H``.
SPLIT exists for the GPU: at N = 8192 and ``BLOCK_N = 128`` the token blocks alone are 64
programs, half of a 132-SM part, so the vocabulary is split until there are about two programs
per SM. The logits never reach HBM; the forward's memory is 16 bytes per token and split.

Backward, with upstream gradients ``g`` (of logp) and ``g_H`` (of H):

    dL/dlogits_j = (1/T) * ( g * ([j == y] - p_j)  -  g_H * p_j * (log p_j + H) )
    grad_hidden = dlogits @ weight      grad_weight = dlogits.T @ hidden      grad_bias = sum_i dlogits_i

A program that owns a ``[BLOCK_N, BLOCK_V]`` tile of ``dlogits`` contributes to a
``[BLOCK_N, H]`` block of ``grad_hidden`` and a ``[BLOCK_V, H]`` block of ``grad_weight``; at
H = 4096 neither fits in registers (128 x 4096 fp32 is 2 MiB), so a gradient block written once
by one program would mean recomputing each logits tile ``H / BLOCK_H`` times (x64). Two schemes
are offered instead (``FusedHeadOptions.backward``):

* ``"dlogits"`` (default): ``_dlogits_kernel``, grid ``(cdiv(N, BLOCK_N), cdiv(Vc, BLOCK_V))``
  over one vocabulary chunk of ``Vc`` columns, recomputes each logits tile with ``tl.dot`` and
  turns it in registers into ``dlogits``, stored in the input dtype (bf16: 2 bytes per entry; the
  logits themselves are never stored). Then two matmuls per chunk in the input dtype with fp32
  accumulation: ``grad_weight[chunk] = dlogits.T @ hidden`` (each block written once) and
  ``grad_hidden += dlogits @ weight[chunk]`` (an fp32 ``[N, H]`` sum over chunks). Cost: the one
  recomputing matmul plus the two gradient matmuls at library speed, plus 6 bytes of HBM traffic
  per logit (write, two reads): at N = 8192, V = 128256 that is 6 GB, about 1.3 ms at 4.8 TB/s
  against about 35 ms of matmuls. Memory: one chunk of ``N x Vc`` in the input dtype
  (``chunk_bytes``, 256 MiB by default).
* ``"atomic"``: fully fused, ``_atomic_bwd_kernel`` with grid ``(cdiv(N, BLOCK_N), cdiv(V,
  BLOCK_V))``; each program recomputes its logits tile, forms ``dlogits`` and then, in a second
  pass over ``H`` in ``BLOCK_HG`` slices, adds ``tl.dot(dlogits, W_tile)`` into ``grad_hidden`` and
  ``tl.dot(dlogits.T, hidden_block)`` into ``grad_weight`` with fp32 atomics. Nothing of size
  ``N x V`` touches HBM, but it costs ``N*H*V/BLOCK_V + V*H*N/BLOCK_N`` fp32 atomic adds
  (1.0e11 at N = 8192, H = 4096, V = 128256 and its 64 x 128 tiles: about 400 GB of L2
  read-modify-write, several times the matmuls' time) and an fp32 ``[V, H]`` scratch for
  ``grad_weight`` (2 GiB at that shape). Kept for small N and as the fully fused reference
  form; not the default.

``grad_bias`` is summed over token blocks with fp32 atomics into a ``[V]`` buffer in both schemes
(``V * N / BLOCK_N`` adds, negligible).

The interpreter (``TRITON_INTERPRET=1``, the CPU test path): ``tl.dot`` on bf16 operands returns
garbage there (DESIGN.md), so under it the kernels upcast both operands to fp32 before each dot
(the ``UPCAST`` constexpr, set from the interpreter flag); on a GPU the operands stay in the input
dtype (bf16/fp16 ``tl.dot`` -> wgmma on sm_90, mma on sm_80). fp32 inputs use ``ieee`` dots (no
tf32), to match the fp32 reference; that is a correctness path, not a fast one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._dispatch import TRITON_INTERPRETER, resolve_backend
from .logprobs import check_head_inputs, check_labels

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Programs per SM the forward grid aims at (it splits the vocabulary until it gets there).
PROGRAMS_PER_SM = 2
# Shortest vocabulary range (in tiles) the forward split makes by default.
MIN_SPLIT_TILES = 4
# SMs assumed when the device cannot tell (an H100/H200 has 132).
DEFAULT_SMS = 132


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch shape of one kernel (``tl.dot`` wants every block >= 16)."""

    n: int  # BLOCK_N tokens
    v: int  # BLOCK_V vocabulary columns (a multiple of 128 on the GPU)
    h: int  # BLOCK_H hidden slice of each logits dot (the backward's must equal the forward's)
    h_grad: int | None = None  # "atomic": hidden slice of its gradient dots (None: h)
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("n", "v", "h", "h_grad"):
            size = getattr(self, name)
            if size is not None and (size < 16 or size & (size - 1)):
                raise ValueError(f"Blocks.{name} = {size}: tl.dot needs a power of two >= 16")


# GPU, forward and "dlogits" backward: 128 x 128 logits tiles (an fp32 accumulator of 64
# registers a thread at 8 warps), 64-wide hidden slices (128 bytes of bf16 a row per load).
# "atomic" backward: it holds dlogits and two gradient tiles at once, so 64 x 128 tiles and
# 32-wide slices for the gradient dots keep it free of spills on sm_80 (registers and spills of
# every launch: test_fused_kernels_compile_for_sm90_and_sm80 in tests/kernels/test_fused_head.py).
# Interpreter: small blocks, few iterations.
GPU_BLOCKS = Blocks(n=128, v=128, h=64, num_warps=8, num_stages=3)
GPU_ATOMIC_BLOCKS = Blocks(n=64, v=128, h=64, h_grad=32, num_warps=8, num_stages=3)
INTERPRETER_BLOCKS = Blocks(n=16, v=128, h=16, num_warps=4, num_stages=1)


@dataclass(frozen=True)
class FusedHeadOptions:
    """Everything but the tensors. Scalars reach the kernels as runtime arguments."""

    ignore_index: int = -100
    temperature: float = 1.0
    blocks: Blocks | None = None  # forward and "dlogits"; None: GPU_BLOCKS (INTERPRETER_BLOCKS there)
    atomic_blocks: Blocks | None = None  # "atomic" backward; None: GPU_ATOMIC_BLOCKS (likewise)
    split: int | None = None  # vocabulary ranges per token block in the forward; None: fill the GPU
    backward: str = "dlogits"  # "dlogits" or "atomic", see the module docstring
    chunk_bytes: int = 256 * 2**20  # "dlogits": bytes of one N x Vc chunk of dlogits

    def resolved_blocks(self, atomic: bool = False) -> Blocks:
        if atomic:
            return self.atomic_blocks or (INTERPRETER_BLOCKS if TRITON_INTERPRETER else GPU_ATOMIC_BLOCKS)
        return self.blocks or (INTERPRETER_BLOCKS if TRITON_INTERPRETER else GPU_BLOCKS)


# ----------------------------------------------------------------------------------------------
# Kernels. Every kernel sees hidden [N, H] and weight [V, H] with a unit stride along H.
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Wrappers.
# ----------------------------------------------------------------------------------------------


def _dot_flags(dtype: torch.dtype) -> dict:
    """UPCAST under the interpreter (its bf16 dot is wrong); ieee dots whenever operands are fp32."""
    upcast = TRITON_INTERPRETER
    fp32 = upcast or dtype == torch.float32
    return {"UPCAST": upcast, "PRECISION": "ieee" if fp32 else "tf32"}


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def forward_split(n: int, v: int, blocks: Blocks, sms: int, split: int | None = None) -> tuple[int, int]:
    """``(SPLIT, columns per split)`` of the forward grid: whole tiles per range, no empty range.

    By default the ranges are as long as they can be while giving ``PROGRAMS_PER_SM`` programs per
    SM, but at least ``MIN_SPLIT_TILES`` tiles (each range ends with a combine; a short range
    is all overhead). An explicit ``split`` is met as closely as whole tiles allow.
    """
    tiles = triton.cdiv(v, blocks.v)
    if split is None:
        wanted = triton.cdiv(PROGRAMS_PER_SM * sms, triton.cdiv(n, blocks.n))
        per_tiles = max(MIN_SPLIT_TILES, tiles // wanted)
    else:
        per_tiles = triton.cdiv(tiles, max(1, split))
    per_tiles = min(per_tiles, tiles)
    return triton.cdiv(tiles, per_tiles), per_tiles * blocks.v


def _forward(hidden, weight, bias, labels, opts: FusedHeadOptions, with_entropy: bool):
    (n, h), v = hidden.shape, weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    if n == 0:
        return torch.empty(0, **f32), torch.empty(0, 2, **f32), torch.empty(0, **f32) if with_entropy else None
    blocks = opts.resolved_blocks()
    split, per = forward_split(n, v, blocks, _num_sms(hidden.device), opts.split)
    part = torch.empty(split, n, 4, **f32)
    logp, norm = torch.empty(n, **f32), torch.empty(n, 2, **f32)
    ent = torch.empty(n, **f32) if with_entropy else None
    _fwd_kernel[(triton.cdiv(n, blocks.n), split)](
        hidden, weight, bias if bias is not None else part, labels, part,
        n, v, h, hidden.stride(0), weight.stride(0), per, LOG2E / opts.temperature, opts.ignore_index,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, **_dot_flags(hidden.dtype),
        BLOCK_N=blocks.n, BLOCK_V=blocks.v, BLOCK_H=blocks.h,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    block = 128
    _combine_kernel[(triton.cdiv(n, block),)](
        part, labels, logp, norm, ent if ent is not None else logp, n, split, opts.ignore_index,
        WITH_ENTROPY=with_entropy, BLOCK=block, num_warps=4,
    )
    return logp, norm, ent


def _backward(hidden, weight, bias, labels, norm, ent, g_logp, g_ent, opts, needs):
    """``(grad_hidden, grad_weight, grad_bias)``, each None where ``needs`` says so."""
    need_h, need_w, need_b = needs
    (n, h), v = hidden.shape, weight.shape[0]
    blocks = opts.resolved_blocks(atomic=opts.backward == "atomic")
    f32 = dict(dtype=torch.float32, device=hidden.device)
    g_logp = torch.zeros(n, **f32) if g_logp is None else g_logp.float().contiguous()
    with_entropy = ent is not None
    if n == 0:
        return (
            torch.zeros_like(hidden) if need_h else None,
            torch.zeros_like(weight) if need_w else None,
            torch.zeros_like(bias) if need_b else None,
        )
    if with_entropy and g_ent is None:
        g_ent = torch.zeros(n, **f32)
    g_ent = g_ent.float().contiguous() if with_entropy else g_logp
    grad_b = torch.zeros(v, **f32) if need_b else None
    common = dict(
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, **_dot_flags(hidden.dtype),
        BLOCK_N=blocks.n, BLOCK_V=blocks.v, BLOCK_H=blocks.h,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    tensors = (hidden, weight, bias if bias is not None else norm, labels, norm,
               ent if with_entropy else norm, g_logp, g_ent)
    scale = LOG2E / opts.temperature

    if opts.backward == "atomic":
        grad_h = torch.zeros(n, h, **f32) if need_h else None
        grad_w = torch.zeros(v, h, **f32) if need_w else None
        _atomic_bwd_kernel[(triton.cdiv(n, blocks.n), triton.cdiv(v, blocks.v))](
            *tensors,
            grad_h if need_h else norm, grad_w if need_w else norm, grad_b if need_b else norm,
            n, v, h, hidden.stride(0), weight.stride(0), scale, opts.ignore_index,
            NEED_H=need_h, NEED_W=need_w, NEED_BIAS=need_b, BLOCK_HG=blocks.h_grad or blocks.h, **common,
        )
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )

    # "dlogits": vocabulary chunks of whole tiles; each chunk's dlogits, then two matmuls.
    low_precision = weight.dtype != torch.float32
    grad_h = torch.zeros(n, h, **f32) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    step = max(1, opts.chunk_bytes // (weight.element_size() * n * blocks.v)) * blocks.v
    step = min(step, triton.cdiv(v, blocks.v) * blocks.v)
    dz = torch.empty(n, min(step, v), dtype=weight.dtype, device=hidden.device)
    for v0 in range(0, v, step):
        v1 = min(v0 + step, v)
        d = dz[:, : v1 - v0]
        # 1. dlogits of columns v0:v1 (and their bias gradient), logits recomputed on chip.
        _dlogits_kernel[(triton.cdiv(n, blocks.n), triton.cdiv(v1 - v0, blocks.v))](
            *tensors, d, grad_b if need_b else norm,
            n, v1, h, hidden.stride(0), weight.stride(0), d.stride(0), v0, scale, opts.ignore_index,
            NEED_BIAS=need_b, **common,
        )
        # 2. The gradient matmuls in the input dtype (fp32 accumulation inside each): the weight
        #    gradient block is written once; the hidden gradient sums over chunks in fp32.
        if need_h:
            if low_precision:
                grad_h += d @ weight[v0:v1]
            else:
                grad_h.addmm_(d, weight[v0:v1])
        if need_w:
            torch.mm(d.t(), hidden, out=grad_w[v0:v1])
    return (
        None if grad_h is None else grad_h.to(hidden.dtype),
        grad_w,
        None if grad_b is None else grad_b.to(bias.dtype),
    )


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: FusedHeadOptions, with_entropy: bool):
        logp, norm, ent = _forward(hidden, weight, bias, labels, opts, with_entropy)
        ctx.save_for_backward(hidden, weight, bias, labels, norm, ent)
        ctx.opts = opts
        if not with_entropy:
            return logp
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, labels, norm, ent = ctx.saved_tensors
        grads = _backward(
            hidden, weight, bias, labels, norm, ent, grad_logp, grad_ent, ctx.opts, ctx.needs_input_grad[:3]
        )
        return (*grads, None, None, None)


def fused_linear_logprobs(
    hidden,
    weight,
    labels,
    bias=None,
    ignore_index=-100,
    temperature=1.0,
    *,
    return_entropy=False,
    options: FusedHeadOptions | None = None,
):
    """fp32 log-prob of each label under ``softmax((hidden @ weight.T + bias) / temperature)``.

    The Triton fused lm_head: same arguments and results as ``linear_logprobs`` (``hidden [..., H]``,
    ``weight [V, H]``, ``labels [...]``, ``bias [V]`` optional; ``logp [...]`` or ``(logp, entropy)``,
    0 where the label is ``ignore_index``, differentiable in hidden, weight and bias), with the
    logits kept on chip. Needs CUDA tensors, or ``TRITON_INTERPRET=1`` on the CPU. ``options``
    overrides blocks, the forward split and the backward scheme (``FusedHeadOptions``); its
    ``ignore_index`` and ``temperature`` are replaced by the arguments.
    """
    check_head_inputs(hidden, weight, labels, bias)
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the fused lm_head takes fp32, bf16 or fp16 inputs, got {hidden.dtype}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    opts = replace(options or FusedHeadOptions(), ignore_index=int(ignore_index), temperature=float(temperature))
    if opts.backward not in ("dlogits", "atomic"):
        raise ValueError(f"backward={opts.backward!r}: expected 'dlogits' or 'atomic'")
    if opts.backward == "atomic" and opts.resolved_blocks(atomic=True).h != opts.resolved_blocks().h:
        raise ValueError("atomic_blocks.h must equal blocks.h: the backward recomputes the forward's logits bit for bit")
    resolve_backend(hidden.device, "triton")  # a clear error off CUDA without the interpreter
    check_labels(labels, weight.shape[0], opts.ignore_index)
    out = _FusedLinearLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        labels.reshape(-1).long().contiguous(),
        opts,
        return_entropy,
    )
    if not return_entropy:
        return out.view(labels.shape)
    return out[0].view(labels.shape), out[1].view(labels.shape)
