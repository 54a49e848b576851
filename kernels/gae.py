"""Generalized advantage estimation: the discounted reverse scan of PPO, and TRL's advantages.

GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation"), per row of a padded ``[B, T]`` batch with mask ``m``, as TRL 0.7.10 computes it:

    v_t     = values_t * m_t,   r_t = rewards_t * m_t
    delta_t = r_t + gamma * v_{t+1} - v_t                  (v_T = 0)
    A_t     = delta_t + c * A_{t+1},   c = gamma * lam     (A_T = 0)
            = sum_{k >= t} c^{k - t} delta_k

The mask zeroes values and rewards but does not cut the recursion: a hole passes the advantage of
later steps through (its delta is ``gamma * v_{t+1}``), and left-padding positions get advantages
too; whitening takes its statistics over the mask only, so they count for nothing. Every path
reproduces that exactly. ``compute_advantages`` adds TRL's bookkeeping: optional reward whitening
(scale only), ``returns = A + v``, then ``A`` whitened over the mask.

Three paths for the scan:

- Triton: each program owns a block of rows and walks time backwards in tiles of ``BLOCK_T``
  steps. A tile is loaded in ascending steps (contiguous loads) and scanned from its latest step
  back, ``A_t = delta_t + c A_{t+1}``: one affine step ``A <- b + a A`` per element with
  ``(a, b) = (c, delta)``. Affine steps compose associatively,

      (a_1, b_1) then (a_2, b_2) = (a_1 a_2, b_2 + a_2 b_1),

  so ``tl.associative_scan(..., reverse=True)`` solves the tile at once; the advantage carried in
  from the later tile is folded into the latest element (``b = delta + c A_carry``), and the
  tile's earliest element is the carry for the tile before it. A small batch (fewer than 2
  programs per multiprocessor) also splits each row's time into segments of ``L`` steps, in two
  launches: the first finds each segment's head (its advantage at its first step with nothing
  carried in), the second starts each segment from the advantage after it,
  ``A(start of s+1) = sum_{s' > s} c^{L (s' - s - 1)} head_{s'}`` (Horner over the later heads).
- torch: time in blocks of ``L`` steps. Within a block, ``A_i = sum_{j >= i} c^{j-i} delta_j`` is
  one matmul with the ``[L, L]`` upper-triangular matrix ``M_ij = c^{j-i}``. The advantage at each
  block's first step obeys the same recurrence across blocks with ``c^L`` (solved by the same
  function, recursively), and adds ``c^{L-i} A_next`` to step ``i`` of the block before it. Every
  factor is a power ``c^k`` with ``k >= 0``: nothing grows, so it is stable at any ``T`` (unlike
  rescaling a cumulative sum by ``c^{-t}``, which overflows fp32 past ``t = 840`` for ``c = 0.9``).
  (On CUDA that matmul follows torch's TF32 setting; the default there is the Triton path.)
- reference: the per-step Python loop, in fp32.

Everything is fp32 whatever the input dtype. No gradients: TRL detaches advantages and computes
them from detached rollout values, so these ops run under ``torch.no_grad``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import resolve_backend
from ._launch import Launch, multiprocessors
from .rl import masked_whiten

# Torch path: time steps per block (one [L, L] discount matrix).
TORCH_BLOCK = 32


# ----------------------------------------------------------------------------------------------
# Triton path: a block of rows and a segment of time per program, time tiles walked backwards, a
# scan per tile.
# ----------------------------------------------------------------------------------------------

# Steps per time segment at the least, when a small batch splits its rows' time over programs.
MIN_SEGMENT = 16


@triton.jit
def _affine_then(a_1, b_1, a_2, b_2):
    # The step A <- b_1 + a_1 A followed by A <- b_2 + a_2 A, as one affine step.
    return a_1 * a_2, b_2 + a_2 * b_1


@triton.jit
def _gae_kernel(
    VALUES, REWARDS, MASK, ADV, HEADS,
    stride_v, stride_r, stride_m, stride_a,
    B, T, gamma, lam, seg_len, n_seg, c_seg,
    HAS_MASK: tl.constexpr, PASS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # PASS 0: one segment per row, carry 0 at the row's end. PASS 1: only each segment's head
    # (its advantage at its first step with carry 0) into HEADS [B, n_seg]. PASS 2: every
    # segment, with the carry its later segments' heads give.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    seg = tl.program_id(1)
    row_ok = rows < B
    rows = rows.to(tl.int64)
    k = tl.arange(0, BLOCK_T)
    c = gamma * lam

    # 1. The advantage at the step after this segment (0 past the row's end): Horner over the
    #    heads of the later segments, A(start of s) = head_s + c^seg_len A(start of s + 1).
    carry = tl.zeros((BLOCK_B,), tl.float32)
    if PASS == 2:
        for i in range(0, n_seg - 1 - seg):
            head = tl.load(HEADS + rows * n_seg + (n_seg - 1 - i), mask=row_ok, other=0.0)
            carry = head + c_seg * carry

    # 2. This segment's tiles, latest first; each tile in ascending steps t = t0 + k, so loads
    #    are contiguous (the next step's value is a second load, one step on).
    lo = seg * seg_len
    n_tiles = tl.cdiv(tl.minimum(seg_len, T - lo), BLOCK_T)
    for j in range(0, n_tiles):
        t = lo + (n_tiles - 1 - j) * BLOCK_T + k
        ok = row_ok[:, None] & (t < T)[None, :]
        has_next = row_ok[:, None] & (t + 1 < T)[None, :]
        v_off = rows[:, None] * stride_v + t[None, :]
        v = tl.load(VALUES + v_off, mask=ok, other=0.0).to(tl.float32)
        v_next = tl.load(VALUES + v_off + 1, mask=has_next, other=0.0).to(tl.float32)
        r = tl.load(REWARDS + rows[:, None] * stride_r + t[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_MASK:
            m_off = rows[:, None] * stride_m + t[None, :]
            v = v * tl.load(MASK + m_off, mask=ok, other=0.0).to(tl.float32)
            v_next = v_next * tl.load(MASK + m_off + 1, mask=has_next, other=0.0).to(tl.float32)
            r = r * tl.load(MASK + m_off, mask=ok, other=0.0).to(tl.float32)

        # 3. TD residuals, in the reference's order of operations (0 past the row's end).
        delta = r + gamma * v_next - v

        # 4. Fold the carry into the tile's latest step, then scan the affine steps (c, delta)
        #    from the latest step back: A_t = delta_t + c A_{t+1}.
        b = tl.where(k[None, :] == BLOCK_T - 1, delta + c * carry[:, None], delta)
        a = tl.zeros((BLOCK_B, BLOCK_T), tl.float32) + c
        _, adv = tl.associative_scan((a, b), 1, _affine_then, reverse=True)
        if PASS != 1:
            tl.store(ADV + rows[:, None] * stride_a + t[None, :], adv, mask=ok)

        # 5. The tile's earliest step is the carry for the tile before it.
        carry = tl.sum(tl.where(k[None, :] == 0, adv, 0.0), 1)
    if PASS == 1:
        tl.store(HEADS + rows * n_seg + seg, carry, mask=row_ok)


def _gae_plan(rows: int, steps: int, sms: int) -> dict:
    """Rows per program, time tile, and the time segments a small batch is split into.

    Several short rows per program (tiles of up to 1024 elements) while that keeps 2 programs per
    multiprocessor; when the rows alone give fewer than 2 programs per multiprocessor, each row's time is
    cut into power-of-two segments (at least MIN_SEGMENT steps) to make up the count.
    """
    block_t = min(triton.next_power_of_2(steps), 256)
    fill = max(1, rows // (2 * sms))  # rows per program that still leave 2 programs per SM
    block_b = min(max(1, 1024 // block_t), 1 << (fill.bit_length() - 1))
    want = triton.cdiv(2 * sms, triton.cdiv(rows, block_b))  # segments per row wanted
    seg_len = triton.cdiv(steps, block_t) * block_t  # one segment: the whole row
    if want > 1 and steps >= 2 * MIN_SEGMENT:
        seg_len = max(MIN_SEGMENT, 1 << ((steps // want).bit_length() - 1) if steps >= want else 0)
        block_t = min(block_t, seg_len)
    # 4 elements per thread at least (16-byte loads of fp32), up to 4 warps.
    warps = min(4, max(1, block_b * block_t // 128))
    return {"BLOCK_B": block_b, "BLOCK_T": block_t, "seg_len": seg_len, "n_seg": triton.cdiv(steps, seg_len), "num_warps": warps}


def gae_launches(
    v: torch.Tensor, r: torch.Tensor, m: torch.Tensor | None, adv: torch.Tensor, heads: torch.Tensor | None,
    gamma: float, lam: float, sms: int,
) -> list[Launch]:
    """The launches of ``_gae_kernel`` for fp32 ``adv [B, T]``: one pass, or with time segments a
    pass for the segments' heads (into ``heads [B, n_seg]``, see ``_gae_plan``) and one for the
    advantages. ``heads`` may be None when one segment suffices."""
    B, T = v.shape
    plan = _gae_plan(B, T, sms)
    n_seg = plan["n_seg"]
    c_seg = float((gamma * lam) ** plan["seg_len"])
    args = (v, r, m if m is not None else v, adv, heads if heads is not None else adv,
            v.stride(0), r.stride(0), m.stride(0) if m is not None else 0, adv.stride(0),
            B, T, float(gamma), float(lam), plan["seg_len"], n_seg, c_seg)
    grid = (triton.cdiv(B, plan["BLOCK_B"]), n_seg)
    opts = {"HAS_MASK": m is not None, "BLOCK_B": plan["BLOCK_B"], "BLOCK_T": plan["BLOCK_T"]}
    passes = (0,) if n_seg == 1 else (1, 2)
    return [Launch(_gae_kernel, grid, args, {**opts, "PASS": p}, num_warps=plan["num_warps"]) for p in passes]


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _gae_triton(values, rewards, mask, gamma, lam):
    B, T = values.shape
    adv = torch.empty(B, T, dtype=torch.float32, device=values.device)
    if adv.numel() == 0:
        return adv
    v, r = _unit_stride(values), _unit_stride(rewards)
    m = None if mask is None else _unit_stride(mask if mask.dtype.is_floating_point else mask.to(torch.float32))
    sms = multiprocessors(values.device)
    n_seg = _gae_plan(B, T, sms)["n_seg"]
    heads = torch.empty(B, n_seg, dtype=torch.float32, device=values.device) if n_seg > 1 else None
    for launch in gae_launches(v, r, m, adv, heads, gamma, lam, sms):
        launch()
    return adv


# ----------------------------------------------------------------------------------------------
# Torch path: blocks of TORCH_BLOCK steps, one discount-matrix matmul per level.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _discounts(c: float, L: int, device: torch.device):
    """fp32 ``M [L, L]`` with ``M_ij = c^{j-i}`` for ``j >= i`` (else 0), and ``tail_i = c^{L-i}``."""
    k = torch.arange(L, dtype=torch.float64)
    power = k[None, :] - k[:, None]  # j - i
    matrix = torch.where(power >= 0, c ** power.clamp(min=0), 0.0)  # c^0 = 1, also for c = 0
    return matrix.to(device, torch.float32), (c ** (L - k)).to(device, torch.float32)


def _discounted_suffix_sums(delta: torch.Tensor, c: float) -> torch.Tensor:
    """``A_t = delta_t + c A_{t+1}`` (``A_T = 0``) along the last dim of fp32 ``delta [R, T]``."""
    R, T = delta.shape
    L = min(T, TORCH_BLOCK)
    n = -(-T // L)
    matrix, tail = _discounts(c, L, delta.device)
    # 1. Within each block: local_i = sum_{j >= i} c^{j-i} delta_j, one [L, L] matmul.
    blocks = (delta if n * L == T else F.pad(delta, (0, n * L - T))).view(R, n, L)
    local = blocks @ matrix.t()
    if n == 1:
        return local.view(R, L)
    # 2. A at each block's first step: the same recurrence across blocks, with c^L.
    heads = _discounted_suffix_sums(local[:, :, 0].contiguous(), c**L)
    # 3. Each block continues from the next block's first step: + c^{L-i} A_next.
    after = F.pad(heads[:, 1:], (0, 1))
    return local.addcmul_(after[:, :, None], tail).view(R, n * L)[:, :T]


def _gae_torch(values, rewards, mask, gamma, lam):
    v, r = values.float(), rewards.float()
    if mask is None:
        delta = r.clone()  # delta is built in place: never over the caller's rewards
    else:
        m = mask.float()
        v, delta = v * m, r * m
    # delta_t = (r_t + gamma v_{t+1}) - v_t, in the reference's order of operations.
    delta[:, :-1].add_(v[:, 1:], alpha=gamma)
    delta.sub_(v)
    if delta.numel() == 0:
        return delta
    return _discounted_suffix_sums(delta, gamma * lam)


# ----------------------------------------------------------------------------------------------
# Reference: the per-step loop, fp32.
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def gae_reference(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None, gamma: float, lam: float
) -> torch.Tensor:
    """The loop over time steps, latest first; unwhitened fp32 advantages ``[B, T]``."""
    values, rewards = values.float(), rewards.float()
    if mask is not None:
        values, rewards = values * mask, rewards * mask
    T = rewards.shape[-1]
    lastgaelam = 0.0
    reversed_advantages = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_advantages.append(lastgaelam)
    if not reversed_advantages:
        return torch.zeros_like(rewards)
    return torch.stack(reversed_advantages[::-1], dim=1)


# ----------------------------------------------------------------------------------------------
# Public ops.
# ----------------------------------------------------------------------------------------------


def _check(values, rewards, mask):
    if values.dim() != 2:
        raise ValueError(f"values must be [B, T], got shape {tuple(values.shape)}")
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} must match values {tuple(values.shape)}")
    if mask is not None and mask.shape != values.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match values {tuple(values.shape)}")


def _scan(values, rewards, mask, gamma, lam, path):
    fn = {"triton": _gae_triton, "torch": _gae_torch, "reference": gae_reference}[path]
    return fn(values, rewards, mask, float(gamma), float(lam))


@torch.no_grad()
def gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None, gamma: float, lam: float, *,
    backend: str | None = None,
) -> torch.Tensor:
    """Unwhitened GAE advantages, fp32 ``[B, T]`` (see the module docstring); no gradients.

    ``values``/``rewards [B, T]`` in any float dtype, ``mask [B, T]`` 0/1 (bool or numeric; None
    for no masking), ``gamma``/``lam`` Python scalars.
    """
    _check(values, rewards, mask)
    return _scan(values, rewards, mask, gamma, lam, resolve_backend(values.device, backend))


@torch.no_grad()
def compute_advantages(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
    whiten_rewards: bool = False, *, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL 0.7.10's ``(values, advantages, returns)``, each fp32 ``[B, T]``; no gradients.

    ``values`` and ``rewards`` are masked; with ``whiten_rewards`` the rewards are rescaled to unit
    masked variance (mean kept); ``returns = A + values``; the advantages come back whitened over
    the mask. Raises ValueError if the mask holds fewer than two positions (whitening needs an
    unbiased variance).
    """
    _check(values, rewards, mask)
    path = resolve_backend(values.device, backend)
    mask = mask.float()
    values = values.float() * mask
    rewards = rewards.float() * mask
    if whiten_rewards:
        # Whitened rewards are no longer 0 where the mask is: the scan must not mask them again.
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages = _scan(values, rewards, None, gamma, lam, path)
    returns = advantages + values
    advantages = masked_whiten(advantages, mask)
    return values, advantages, returns
