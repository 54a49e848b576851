"""Segment reductions over the packed layout: per-sequence sums and means of per-token values.

A packed row holds S sequences end to end in N tokens. Sequence s owns tokens
``cu_seqlens[s] <= t < cu_seqlens[s + 1]``; equivalently ``seq_index[t] = s``.

    segment_sum(x)[s]        = sum_{t in s} x_t
    segment_mean(x, mask)[s] = sum_{t in s} m_t x_t / sum_{t in s} m_t     (0 for a segment with no m_t)

A segment with nothing to average gives 0, never 0/0: a DPO completion that truncation emptied must
not turn the loss into NaN. Gradients: d sum_s / d x_t = 1 and d mean_s / d x_t = m_t / count_s for
the segment s that holds t.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import resolve_backend
from ._launch import Launch, multiprocessors

# Tokens per block of the Triton kernel: 4 fp32 (16 bytes) per thread at 2 warps.
BLOCK = 256


@triton.jit
def _segment_sum_kernel(X, CU, PARTIAL, N, BLOCK: tl.constexpr):
    # Program (seg, part) of a (S, P) grid sums every P-th block of segment seg, from block part.
    seg = tl.program_id(0)
    part = tl.program_id(1)
    n_part = tl.num_programs(1)
    # 1. This segment's token range, and the first BLOCK-aligned block that overlaps it: aligned
    #    blocks give 16-byte loads; tokens of the neighbouring segments are masked out after.
    start = tl.load(CU + seg).to(tl.int64)
    end = tl.load(CU + seg + 1).to(tl.int64)
    first = start // BLOCK * BLOCK
    # 2. Sum this program's blocks in fp32.
    acc = tl.zeros((BLOCK,), tl.float32)
    for off in range(first + part * BLOCK, end, n_part * BLOCK):
        idx = off + tl.arange(0, BLOCK)
        x = tl.load(X + idx, mask=idx < N, other=0.0).to(tl.float32)
        acc += tl.where((idx >= start) & (idx < end), x, 0.0)
    tl.store(PARTIAL + seg * n_part + part, tl.sum(acc, 0))


def segment_sum_launch(values: torch.Tensor, cu_seqlens: torch.Tensor, partial: torch.Tensor) -> Launch:
    """The launch of ``_segment_sum_kernel`` into ``partial [S, P]`` (summed over P after)."""
    S, P = partial.shape
    return Launch(_segment_sum_kernel, (S, P), (values, cu_seqlens, partial, values.shape[0]), {"BLOCK": BLOCK}, 2)


def segment_parts(n: int, segments: int, sms: int) -> int:
    """Programs per segment: enough for 2 per multiprocessor, never more than the blocks there are."""
    return max(1, min(triton.cdiv(2 * sms, max(segments, 1)), triton.cdiv(n, max(segments, 1) * BLOCK)))


class _SegmentSumTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, cu_seqlens, seq_index):
        n_seg = cu_seqlens.numel() - 1
        parts = segment_parts(values.shape[0], n_seg, multiprocessors(values.device))
        partial = torch.empty(n_seg, parts, dtype=torch.float32, device=values.device)
        segment_sum_launch(values.contiguous(), cu_seqlens, partial)()
        ctx.save_for_backward(seq_index)
        return partial.sum(1)

    @staticmethod
    def backward(ctx, grad):
        (seq_index,) = ctx.saved_tensors
        return grad[seq_index], None, None


def check_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> None:
    """``cu_seqlens`` is a layout of ``n`` tokens: an integer ``[S+1]`` running from 0 to ``n``
    without decreasing (an empty sequence is allowed); name the first fault."""
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n:
        raise ValueError(f"cu_seqlens must run from 0 to N={n}, got {cu_seqlens.tolist()}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if (lengths < 0).any():
        s = int((lengths < 0).nonzero()[0])
        raise ValueError(f"cu_seqlens must not decrease: cu_seqlens[{s + 1}] < cu_seqlens[{s}]")


def packed_layout(
    values: torch.Tensor, seq_index: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both forms of the layout, ``(seq_index [N] int64, cu_seqlens [S+1] int32)``, checked."""
    if values.dim() != 1:
        raise ValueError(f"values must be one packed row [N], got shape {tuple(values.shape)}")
    if (seq_index is None) == (cu_seqlens is None):
        raise ValueError("give exactly one of seq_index [N] or cu_seqlens [S+1]")
    n = values.shape[0]
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, n)
        cu = cu_seqlens.to(device=values.device, dtype=torch.int32)
        lengths = (cu[1:] - cu[:-1]).long()
        idx = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
        return idx, cu
    if seq_index.shape != values.shape:
        raise ValueError(f"seq_index {tuple(seq_index.shape)} must match values {tuple(values.shape)}")
    idx = seq_index.to(device=values.device, dtype=torch.long)
    if n and (idx[1:] < idx[:-1]).any():
        t = int((idx[1:] < idx[:-1]).nonzero()[0]) + 1
        raise ValueError(f"seq_index must not decrease along the packed row: seq_index[{t}] < seq_index[{t - 1}]")
    if n and int(idx[0]) < 0:
        raise ValueError(f"seq_index[0] = {int(idx[0])} is negative")
    counts = torch.bincount(idx, minlength=0) if n else idx.new_zeros(0)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=values.device)
    cu[1:] = counts.cumsum(0)
    return idx, cu


def segment_sum_reference(
    values: torch.Tensor, seq_index: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain loop over segments, fp32."""
    _, cu = packed_layout(values, seq_index, cu_seqlens)
    bounds = cu.tolist()
    if len(bounds) == 1:
        return values.new_zeros(0, dtype=torch.float32)
    return torch.stack([values[a:b].float().sum() for a, b in zip(bounds[:-1], bounds[1:])])


def segment_sum(
    values: torch.Tensor, seq_index: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, *,
    backend: str | None = None,
) -> torch.Tensor:
    """fp32 per-sequence sums ``[S]`` of per-token ``values [N]``; differentiable.

    The layout is ``seq_index [N]`` (non-decreasing) or ``cu_seqlens [S+1]``; with ``seq_index``
    the number of sequences is ``seq_index[-1] + 1``.
    """
    path = resolve_backend(values.device, backend)
    if path == "reference":
        return segment_sum_reference(values, seq_index, cu_seqlens)
    idx, cu = packed_layout(values, seq_index, cu_seqlens)
    if path == "triton":
        return _SegmentSumTriton.apply(values, cu, idx)
    out = torch.zeros(cu.numel() - 1, dtype=torch.float32, device=values.device)
    return out.index_add(0, idx, values.float())


def segment_mean(
    values: torch.Tensor, seq_index: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None, *, backend: str | None = None,
) -> torch.Tensor:
    """fp32 per-sequence means ``[S]`` of ``values [N]`` over the tokens where ``mask`` is set.

    ``mask [N]`` (bool or 0/1, default all tokens) picks the tokens that count, e.g. loss
    positions. A sequence with no such token gets 0 (and no gradient), not NaN.
    """
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.float32)
    elif mask.shape != values.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match values {tuple(values.shape)}")
    mask = mask.to(torch.float32)
    total = segment_sum(values.float() * mask, seq_index, cu_seqlens, backend=backend)
    count = segment_sum(mask, seq_index, cu_seqlens, backend=backend)
    return total / count.clamp(min=1.0)
