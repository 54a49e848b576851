"""What the kernel benchmarks run: shapes, and each path's forward+backward as a closure.

Every path computes the same thing, the log-prob of each label with its gradients, so timings and
peak memory compare like for like:

- ``lm_head matmuls``: only ``logits = hidden @ W.T`` and its two gradient matmuls, the floor.
- ``naive``: ``hidden @ W.T``, ``log_softmax``, ``gather``, as TRL 0.7.10 computes log-probs.
- ``liger``: Liger-Kernel's fused linear cross-entropy, ``reduction="none"`` (CUDA only).
- ``trl chunked``: TRL's own fused LM head (``trl.kernels.ChunkedLogProbFunction``, what TRL 1.x's
  trainers call with ``fused_lm_head=True``): tiles of 4,096 tokens x 32,768 vocabulary entries,
  folded by a Triton kernel on CUDA and by torch ops elsewhere. Needs ``trl`` importable (a peer,
  never a dependency: ``pip install --no-deps trl``); skipped otherwise.
- ``fastalign torch`` / ``fastalign triton``: ``linear_logprobs`` on that path.
- ``fastalign fused``: ``fastalign.kernels.fused_head.fused_linear_logprobs``, the ``tl.dot`` lm_head
  that keeps the logits on chip (CUDA only; skipped while that module does not exist).

``fused_preference_loss`` (DPO sigmoid loss from hidden states, forward+backward) runs 16
sequences (8 pairs) of ``n / 16`` tokens each, the first quarter of each being prompt:

- ``naive``: full logits for every token, log_softmax, gather, per-sequence sums, the loss.
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (pure torch, runs on CPU), given the
  reference log-probs' work for free as fastalign is (``use_ref_model=False``), not compiled.
- ``trl chunked``: TRL 1.x's DPO loss: per-token log-probs by ``ChunkedLogProbFunction`` (at the
  loss positions on CUDA, at every position elsewhere, as its trainer does), per-sequence sums, the
  sigmoid loss.
- ``fastalign torch`` / ``fastalign triton``: ``fused_preference_loss`` on that path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    op: str  # "linear_logprobs" or "selective_logprobs"
    n: int  # tokens
    h: int  # hidden size (linear_logprobs only)
    v: int  # vocabulary
    dtype: str

    @property
    def label(self) -> str:
        dims = f"N={self.n} H={self.h} V={self.v}" if self.h else f"N={self.n} V={self.v}"
        return f"{self.op} {dims} {self.dtype}"


# On the CPU: the reference shape (a Llama-3-sized vocabulary) in fp32 and bf16; a 32k vocabulary
# at hidden 8192 (1k tokens) and at 16k tokens; selective_logprobs also at Qwen2's 152k vocabulary;
# the DPO loss at the reference shape and at a Llama-2-7B-sized head (hidden 4096, 32k vocabulary).
# 64k tokens at a 32k vocabulary in bf16 too, where the naive path does not fit in this machine's
# memory. Hidden 4096-8192 at 128k+ vocabularies are GPU-only (minutes per round here).
CPU_CASES = [
    Case("linear_logprobs", 4096, 1024, 128256, "fp32"),
    Case("linear_logprobs", 4096, 1024, 128256, "bf16"),
    Case("linear_logprobs", 1024, 8192, 32000, "fp32"),
    Case("linear_logprobs", 16384, 1024, 32000, "bf16"),
    Case("linear_logprobs", 65536, 1024, 32000, "bf16"),
    Case("selective_logprobs", 4096, 0, 128256, "fp32"),
    Case("selective_logprobs", 4096, 0, 152064, "fp32"),
    Case("selective_logprobs", 4096, 0, 152064, "bf16"),
    Case("fused_preference_loss", 16 * 512, 1024, 128256, "fp32"),
    Case("fused_preference_loss", 16 * 512, 1024, 128256, "bf16"),
    Case("fused_preference_loss", 16 * 512, 4096, 32000, "bf16"),
]
QUICK_CASES = [
    Case("linear_logprobs", 1024, 512, 32000, "fp32"),
    Case("selective_logprobs", 1024, 0, 32000, "fp32"),
    Case("fused_preference_loss", 16 * 64, 512, 32000, "fp32"),
]
GPU_CASES = [
    Case("linear_logprobs", n, h, v, dt)
    for (n, h, v) in [(4096, 1024, 128256), (16384, 4096, 128256), (8192, 4096, 152064), (1024, 8192, 32000),
                      (65536, 1024, 32000)]
    for dt in ("bf16", "fp32")
] + [Case("selective_logprobs", n, 0, v, dt) for (n, v) in [(8192, 128256), (8192, 152064), (16384, 32000)] for dt in ("bf16", "fp32")] + [
    Case("fused_preference_loss", 16 * 1024, 4096, 128256, dt) for dt in ("bf16", "fp32")
]

# The GPU acceptance session (benchmarks/gpu_session.sh): the two shapes its table reports, bf16.
SESSION_CASES = [
    Case("selective_logprobs", 8192, 0, 128256, "bf16"),
    Case("linear_logprobs", 16384, 4096, 128256, "bf16"),
]

PATHS = {
    "linear_logprobs": ["lm_head matmuls", "naive", "liger", "trl chunked", "fastalign torch", "fastalign triton",
                        "fastalign fused"],
    "selective_logprobs": ["naive", "fastalign torch", "fastalign triton"],
    "fused_preference_loss": ["naive", "liger", "trl chunked", "fastalign torch", "fastalign triton"],
}


def cases(device: str) -> list[Case]:
    if os.environ.get("FASTALIGN_BENCH_QUICK") == "1":
        return QUICK_CASES
    if os.environ.get("FASTALIGN_BENCH_SESSION") == "1":
        return SESSION_CASES
    return GPU_CASES if device == "cuda" else CPU_CASES


# Bytes per logit the naive path holds at its peak ([N, V] logits, their fp32 log-softmax and its
# gradient; measured 14-16 at N=4096, V=128256).
NAIVE_BYTES_PER_LOGIT = 16


def _memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def unavailable(path: str, device: str, case: Case) -> str | None:
    """Why ``path`` cannot run ``case`` on ``device``, or None."""
    op = case.op
    if path == "naive" and op != "fused_preference_loss":
        need, have = case.n * case.v * NAIVE_BYTES_PER_LOGIT, _memory_bytes(device)
        if need > 0.8 * have:
            return (f"the naive path needs about {need / 2**30:.0f} GiB at this shape, more than this machine's "
                    f"{have / 2**30:.0f} GiB allow")
    if path in ("fastalign triton", "fastalign fused") and device != "cuda":
        return "the triton path runs natively only on CUDA (interpreted it measures nothing useful)"
    if path == "fastalign fused" and fused_head() is None:
        return "fastalign.kernels.fused_head does not export fused_linear_logprobs (yet)"
    if path == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed in this environment"
        if device != "cuda" and op != "fused_preference_loss":
            return "Liger-Kernel's kernels are Triton-only and need a CUDA device"
    if path == "trl chunked":
        try:
            from trl.kernels import ChunkedLogProbFunction  # noqa: F401
        except ImportError:
            return "trl is not installed in this environment (pip install --no-deps trl)"
    return None


def fused_head():
    """``fastalign.kernels.fused_head.fused_linear_logprobs`` (the tl.dot lm_head), or None."""
    try:
        from fastalign.kernels.fused_head import fused_linear_logprobs
    except ImportError:
        return None
    return fused_linear_logprobs


def trl_logprobs(hidden, weight, labels):
    """TRL 1.x's fused LM head: the log-prob of each label, without the ``[N, V]`` logits."""
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 32768, None, 1.0, ("log_probs",))[0]


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[case.dtype]
    labels = torch.randint(0, case.v, (case.n,), generator=g).to(device)
    grad_out = torch.randn(case.n, generator=g).to(device)
    if case.op == "selective_logprobs":
        logits = (torch.randn(case.n, case.v, generator=g) * 2).to(device, dtype).requires_grad_()
        return {"logits": logits, "labels": labels, "grad": grad_out}
    if case.op == "fused_preference_loss":
        return _preference_inputs(case, device, g)
    hidden = torch.randn(case.n, case.h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(case.v, case.h, generator=g) * case.h**-0.5).to(device, dtype).requires_grad_()
    return {"hidden": hidden, "weight": weight, "labels": labels, "grad": grad_out}


def _preference_inputs(case: Case, device: str, g: torch.Generator) -> dict:
    """8 pairs as 16 sequences of equal length; labels on the last three quarters of each."""
    seqs, length = 16, case.n // 16
    prompt = length // 4
    tokens = torch.randint(0, case.v, (seqs, length), generator=g)
    labels = torch.full((seqs, length), -100)
    labels[:, prompt - 1:-1] = tokens[:, prompt:]
    dtype = DTYPES[case.dtype]
    hidden = torch.randn(case.n, case.h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(case.v, case.h, generator=g) * case.h**-0.5).to(device, dtype).requires_grad_()
    return {
        "hidden": hidden, "weight": weight, "labels": labels.reshape(-1).to(device), "labels_2d": labels.to(device),
        "cu_seqlens": torch.arange(0, case.n + 1, length, dtype=torch.int32, device=device),
        "chosen": torch.arange(0, seqs, 2, device=device), "rejected": torch.arange(1, seqs, 2, device=device),
        "ref_chosen": (torch.randn(seqs // 2, generator=g) - 3 * length).to(device),
        "ref_rejected": (torch.randn(seqs // 2, generator=g) - 3 * length).to(device),
    }


def _sigmoid_dpo_loss(tok, x):
    """The DPO sigmoid loss (beta 0.1) from per-token log-probs of the 16 equal-length sequences."""
    import torch.nn.functional as F

    pi = tok.view(len(x["cu_seqlens"]) - 1, -1).sum(-1)
    logits = (pi[x["chosen"]] - pi[x["rejected"]]) - (x["ref_chosen"] - x["ref_rejected"])
    return -F.logsigmoid(0.1 * logits).mean()


def _preference_runner(path: str):
    from fastalign.kernels import fused_preference_loss

    def run(x):
        h, w, y = x["hidden"], x["weight"], x["labels"]
        if path == "naive":
            logp = torch.log_softmax((h @ w.t()).float(), -1)
            valid = y != -100
            tok = torch.where(valid, logp.gather(-1, torch.where(valid, y, 0)[:, None])[:, 0], 0.0)
            loss = _sigmoid_dpo_loss(tok, x)
        elif path == "trl chunked":  # as TRL's trainer: loss positions only on CUDA, every position elsewhere
            valid = y != -100
            if h.is_cuda:
                tok = torch.zeros(len(y), device=h.device).masked_scatter(valid, trl_logprobs(h[valid], w, y[valid]))
            else:
                tok = trl_logprobs(h, w, y.clamp(min=0)).masked_fill(~valid, 0.0)
            loss = _sigmoid_dpo_loss(tok, x)
        elif path == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            seqs = x["labels_2d"]
            order = torch.cat((x["chosen"], x["rejected"]))  # chosen first, then rejected
            loss_fn = LigerFusedLinearDPOLoss(beta=0.1, compiled=False, use_ref_model=False)
            out = loss_fn(w, h.view(seqs.shape[0], seqs.shape[1], -1)[order], seqs[order])
            loss = out[0] if isinstance(out, tuple) else out
        else:
            loss = fused_preference_loss(
                h, w, y, x["chosen"], x["rejected"], x["ref_chosen"], x["ref_rejected"],
                cu_seqlens=x["cu_seqlens"], beta=0.1, backend=path.split()[-1],
            ).loss
        loss.backward()
        h.grad = w.grad = None
    return run


def runner(case: Case, path: str):
    """A closure running one forward+backward of ``path`` on inputs from ``make_inputs``."""
    from fastalign.kernels import linear_logprobs, selective_logprobs

    if case.op == "fused_preference_loss":
        return _preference_runner(path)

    if case.op == "selective_logprobs":
        def selective(x):
            if path == "naive":
                out = torch.log_softmax(x["logits"].float(), -1).gather(-1, x["labels"][:, None])[:, 0]
            else:
                out = selective_logprobs(x["logits"], x["labels"], backend=path.split()[-1])
            out.backward(x["grad"])
            x["logits"].grad = None
        return selective

    def linear(x):
        h, w, y, g = x["hidden"], x["weight"], x["labels"], x["grad"]
        if path == "lm_head matmuls":
            logits = h @ w.t()
            logits.backward(logits.detach())  # any [N, V] upstream gradient: the two matmuls
        elif path == "naive":
            logits = h @ w.t()
            (torch.log_softmax(logits.float(), -1).gather(-1, y[:, None])[:, 0]).backward(g)
        elif path == "liger":
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            out = LigerFusedLinearCrossEntropyFunction.apply(h, w, y, None, None, -100, 0.0, 0.0, "none")
            (out[0] if isinstance(out, tuple) else out).backward(g)
        elif path == "trl chunked":
            trl_logprobs(h, w, y).backward(g)
        elif path == "fastalign fused":
            fused_head()(h, w, y).backward(g)
        else:
            linear_logprobs(h, w, y, backend=path.split()[-1]).backward(g)
        h.grad = w.grad = None
    return linear
