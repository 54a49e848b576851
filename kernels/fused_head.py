"""The fused lm_head in Triton, host side: ``fused_linear_logprobs``, its options and its launches.

    logits = hidden @ weight.T + bias           hidden [N, H], weight [V, H], bias [V]
    logp_i = log softmax(logits_i / T)[y_i]     (0 where y_i == ignore_index)
    H_i    = entropy of softmax(logits_i / T)   (optional, 0 where ignored)

Same op as ``linear_logprobs`` (and checked against its ``linear_logprobs_reference``); here the
lm_head matmul itself runs inside the kernels (``fused_head_kernels.py``, with the math), so the
logits never leave the chip.

Forward: the grid is token blocks times ``SPLIT`` ranges of the vocabulary, then a combine.
SPLIT exists for the GPU: at N = 8192 and ``BLOCK_N = 128`` the token blocks alone are 64
programs, half of a 132-SM part, so ``forward_split`` splits the vocabulary until there are about
two programs per SM.

Backward: a program that owns a ``[BLOCK_N, BLOCK_V]`` tile of ``dlogits`` contributes to a
``[BLOCK_N, H]`` block of ``grad_hidden`` and a ``[BLOCK_V, H]`` block of ``grad_weight``; at
H = 4096 neither fits in registers (128 x 4096 fp32 is 2 MiB), so a gradient block written once
by one program would mean recomputing each logits tile ``H / BLOCK_H`` times (x64). Two schemes
are offered instead (``FusedHeadOptions.backward``):

* ``"dlogits"`` (default): per vocabulary chunk of ``Vc`` columns, the kernel recomputes the
  logits and stores ``dlogits`` in the input dtype (bf16: 2 bytes per entry; the logits
  themselves are never stored). Then two matmuls per chunk in the input dtype with fp32
  accumulation: ``grad_weight[chunk] = dlogits.T @ hidden`` (each block written once) and
  ``grad_hidden += dlogits @ weight[chunk]`` (an fp32 ``[N, H]`` sum over chunks). Cost: the one
  recomputing matmul plus the two gradient matmuls at library speed, plus 6 bytes of HBM traffic
  per logit (write, two reads): at N = 8192, V = 128256 that is 6 GB, about 1.3 ms at 4.8 TB/s
  against about 35 ms of matmuls. Memory: one chunk of ``N x Vc`` in the input dtype
  (``chunk_bytes``, 256 MiB by default).
* ``"atomic"``: fully fused, one kernel adds each tile's share of both gradients with fp32
  atomics. Nothing of size ``N x V`` touches HBM, but it costs ``N*H*V/BLOCK_V + V*H*N/BLOCK_N``
  fp32 atomic adds (1.0e11 at N = 8192, H = 4096, V = 128256 and its 64 x 128 tiles: about 400 GB
  of L2 read-modify-write, several times the matmuls' time) and an fp32 ``[V, H]`` scratch for
  ``grad_weight`` (2 GiB at that shape). Kept for small N and as the fully fused reference form;
  not the default.

``grad_bias`` is summed over token blocks with fp32 atomics into a ``[V]`` buffer in both schemes
(``V * N / BLOCK_N`` adds, negligible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton

from ._dispatch import TRITON_INTERPRETER, resolve_backend
from ._launch import multiprocessors
from .fused_head_kernels import _atomic_bwd_kernel, _combine_kernel, _dlogits_kernel, _fwd_kernel
from .linear_logprobs import check_head_inputs
from .logprobs import check_labels

LOG2E = 1.4426950408889634

# Programs per SM the forward grid aims at (it splits the vocabulary until it gets there).
PROGRAMS_PER_SM = 2
# Shortest vocabulary range (in tiles) the forward split makes by default.
MIN_SPLIT_TILES = 4
# SMs assumed off GPU (an H100/H200 has 132), so that the interpreter splits as an H100 would.
DEFAULT_SMS = 132


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch shape of one kernel; every block a power of two >= 16 (``tl.dot``).

    - ``n``: ``BLOCK_N``, tokens per tile
    - ``v``: ``BLOCK_V``, vocabulary columns per tile (a multiple of 128 on the GPU)
    - ``h``: ``BLOCK_H``, the hidden slice of each logits dot (the backward's must equal the forward's)
    - ``h_grad``: ``"atomic"`` backward only, the hidden slice of its gradient dots (None: ``h``)
    - ``num_warps``, ``num_stages``: Triton's launch options
    """

    n: int
    v: int
    h: int
    h_grad: int | None = None
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
    """Everything but the tensors; scalars reach the kernels as runtime arguments.

    - ``ignore_index``, ``temperature``: as for ``linear_logprobs``
    - ``blocks``: the forward's and the ``"dlogits"`` backward's; None: ``GPU_BLOCKS``
      (``INTERPRETER_BLOCKS`` under the interpreter)
    - ``atomic_blocks``: the ``"atomic"`` backward's; None: ``GPU_ATOMIC_BLOCKS`` (likewise)
    - ``split``: vocabulary ranges per token block in the forward; None: fill the GPU (``forward_split``)
    - ``backward``: ``"dlogits"`` or ``"atomic"``, see the module docstring
    - ``chunk_bytes``: ``"dlogits"`` only, bytes of one ``[N, Vc]`` chunk of dlogits
    """

    ignore_index: int = -100
    temperature: float = 1.0
    blocks: Blocks | None = None
    atomic_blocks: Blocks | None = None
    split: int | None = None
    backward: str = "dlogits"
    chunk_bytes: int = 256 * 2**20

    def resolved_blocks(self, atomic: bool = False) -> Blocks:
        """The blocks of the forward and ``"dlogits"`` backward, or with ``atomic`` of the atomic backward."""
        if atomic:
            return self.atomic_blocks or (INTERPRETER_BLOCKS if TRITON_INTERPRETER else GPU_ATOMIC_BLOCKS)
        return self.blocks or (INTERPRETER_BLOCKS if TRITON_INTERPRETER else GPU_BLOCKS)


# ----------------------------------------------------------------------------------------------
# Wrappers.
# ----------------------------------------------------------------------------------------------


def _dot_flags(dtype: torch.dtype) -> dict:
    """UPCAST under the interpreter (its bf16 dot is wrong); ieee dots whenever operands are fp32."""
    upcast = TRITON_INTERPRETER
    fp32 = upcast or dtype == torch.float32
    return {"UPCAST": upcast, "PRECISION": "ieee" if fp32 else "tf32"}


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
    split, per = forward_split(n, v, blocks, multiprocessors(hidden.device, DEFAULT_SMS), opts.split)
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
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    options: FusedHeadOptions | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
