"""The fused preference loss: hidden states of a packed batch straight to the DPO-family loss.

Inputs: one packed row of N tokens holding S sequences (``cu_seqlens`` or ``seq_index``), its
hidden states ``[N, H]``, the lm_head ``weight [V, H]``, ``labels [N]`` (the next token, or
``ignore_index`` where no loss is taken), and the pairs: ``chosen [P]`` and ``rejected [P]``, the
sequence indices of each pair's two halves. Then

    logp_t  = log softmax(h_t W^T / T)[y_t]                     at loss positions only
    pi_s    = sum_{t in s} logp_t    (or the mean, average_log_prob=True)
    loss    = mean over pairs of preference_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
              + nll_coef * nll,    nll = -(sum of logp_t over chosen tokens) / (number of chosen tokens)

The NLL term is the token mean over every chosen completion of the batch, as a cross-entropy over
the chosen half of a padded batch: CPO's behaviour-cloning term (``nll_coef = cpo_alpha``, Xu et
al. 2024, arXiv:2401.08417) and ORPO's SFT term (``nll_coef = 1``, Hong et al. 2024,
arXiv:2403.07691; TRL 1.16 takes ORPO's NLL over the prompt tokens too, here it covers the same
loss positions as the log-probs). The lm_head runs only at loss positions, and a
``[tokens, vocab]`` tensor never exists.

Separable loss types (a pair's loss depends on that pair alone) take one pass: the loss positions
of whole pairs go through in chunks; each chunk's logits give its log-probs, hence its pairs'
``pi``, losses and ``dloss/dpi`` at once, and those logits are turned in place into the gradient
of the loss, ``dlogits_t = dloss/dpi_s(t) * (onehot(y_t) - p_t) / T`` (divided by the sequence's
token count for averages). ``grad_hidden`` and ``grad_weight`` are accumulated in the same pass and
kept for backward, which only scales them by the loss's upstream gradient: three matmuls over the
loss positions, no recompute. On the torch path the chunk's softmax is built in place with one
exp pass (the Triton path uses the row kernels of ``logprobs.py``). Peak memory: one chunk of
pairs' logits plus the gradients.

Loss types that couple the pairs (``kto_pair``, ``bco_pair``, ``aot``, ``aot_pair``: batch means,
sorting) need every pair's ``pi`` before any gradient, so they take two passes: ``linear_logprobs``
(which recomputes the logits in backward), per-sequence sums and ``preference_loss``. The fused
Triton lm_head (``backend="fused"`` or ``FASTALIGN_FUSED_HEAD=1``, see ``linear_logprobs.head_choice``)
takes the same two passes for every loss type, its logits never leaving the chip.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .linear_logprobs import CHUNK_BYTES, chunk_logits, chunk_plan, head_choice, linear_logprobs
from .logprobs import check_labels, make_options, row_grad, row_stats
from .preference import COUPLED_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, preference_loss
from .segments import packed_layout


class PreferenceLossOutput(NamedTuple):
    """What ``fused_preference_loss`` returns, for ``P`` pairs; only ``loss`` carries gradients.

    - ``loss``: scalar, the mean of ``losses``
    - ``losses``: ``[P]`` (``[2P]`` for ``kto_pair``), detached
    - ``chosen_rewards``, ``rejected_rewards``: ``[P]`` each, detached
    - ``chosen_logps``, ``rejected_logps``: ``[P]`` each, the policy's log-probs (sum or mean per
      sequence), detached
    - ``nll_loss``: scalar, the chosen completions' token-mean NLL (0 if they have no token),
      detached; ``loss`` holds ``nll_coef`` times it
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    nll_loss: torch.Tensor


def _pair_layout(seq_index, n_seq, chosen, rejected):
    """Per token: its pair (-1 if none) and role (0 chosen, 1 rejected); checks the pairs."""
    chosen, rejected = chosen.long().to(seq_index.device), rejected.long().to(seq_index.device)
    if chosen.dim() != 1 or chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must be [P], P >= 1")
    both = torch.cat((chosen, rejected))
    if ((both < 0) | (both >= n_seq)).any():
        i = int(((both < 0) | (both >= n_seq)).nonzero()[0])
        name, p = ("chosen", i) if i < chosen.numel() else ("rejected", i - chosen.numel())
        raise ValueError(f"{name}[{p}] = {int(both[i])} is not a sequence index in [0, {n_seq})")
    if torch.unique(both).numel() != both.numel():
        raise ValueError("a sequence appears in more than one pair, or as both halves of one")
    pair_of_seq = torch.full((n_seq,), -1, dtype=torch.long, device=seq_index.device)
    role_of_seq = torch.zeros(n_seq, dtype=torch.long, device=seq_index.device)
    p = torch.arange(chosen.numel(), device=seq_index.device)
    pair_of_seq[chosen], pair_of_seq[rejected] = p, p
    role_of_seq[rejected] = 1
    return pair_of_seq[seq_index], role_of_seq[seq_index]


def _chunks_of_pairs(pair_t, n_pairs, budget):
    """Loss positions grouped by pair, then cut into chunks of whole pairs of about ``budget`` rows
    (a pair longer than that is a chunk of its own)."""
    order = torch.argsort(pair_t, stable=True)
    counts = torch.bincount(pair_t, minlength=n_pairs).tolist()
    chunks, start, rows, first = [], 0, 0, 0
    for p, c in enumerate(counts):
        if rows and rows + c > budget:
            chunks.append((order[start:start + rows], first, p))
            start, rows, first = start + rows, 0, p
        rows += c
    chunks.append((order[start:start + rows], first, n_pairs))
    return chunks


def _logp_in_place(z, y, temperature):
    """Torch path: log-probs of labels ``y`` from logits ``z [m, V]``, leaving ``exp(z/T - max)``
    in ``z`` (the fused loss owns the buffer, so no temporaries and one exp pass).
    Returns ``(logp [m], s [m, 1])`` with ``s`` the row sums of what ``z`` now holds."""
    if temperature != 1.0:
        z.div_(temperature)
    m = z.amax(-1, keepdim=True)
    picked = z.gather(-1, y[:, None])
    s = z.sub_(m).exp_().sum(-1, keepdim=True)
    return (picked - m - s.log())[:, 0], s


def _grad_in_place(z, y, s, g, temperature):
    """Torch path: ``z`` holds ``exp(z/T - max)``; make it ``g (onehot(y) - p) / T`` in place."""
    scale = g[:, None] / temperature
    z.mul_(-scale / s).scatter_add_(-1, y[:, None], scale)


# Rows of the vocabulary per weight-gradient block in low precision (a [block, H] temporary).
WEIGHT_GRAD_BLOCK = 4096


def _add_weight_grad(grad_w, d, h):
    """``grad_w += d^T h`` into the fp32 sum over chunks. In bf16/fp16 the matmul runs in that
    dtype (fp32 accumulation inside, as the model's own matmuls) block by block over the
    vocabulary, so no [V, H] temporary exists; an fp32 matmul on upcast copies would be several
    times slower (2.3x on an AVX-512 CPU, more on tensor cores)."""
    if d.dtype == torch.float32:
        grad_w.addmm_(d.t(), h.float())
        return
    for v0 in range(0, d.shape[1], WEIGHT_GRAD_BLOCK):
        grad_w[v0:v0 + WEIGHT_GRAD_BLOCK] += d[:, v0:v0 + WEIGHT_GRAD_BLOCK].t() @ h


class _FusedSeparable(torch.autograd.Function):
    """One pass: log-probs, loss and all gradients, chunk by chunk of whole pairs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, pos, y, pair_t, role_t, ref, opts, loss_kw):
        n_pairs = ref.shape[1]
        ones = torch.ones_like(pair_t, dtype=torch.float32)
        counts = torch.zeros(2, n_pairs, device=hidden.device).index_put_((role_t, pair_t), ones, accumulate=True)
        denom = counts.clamp(min=1.0) if loss_kw["average_log_prob"] else torch.ones_like(counts)
        # The NLL's share per chosen token: -nll_coef / (chosen tokens of the batch).
        nll_scale = 1.0 / counts[0].sum().clamp(min=1.0)
        nll = torch.zeros((), device=hidden.device)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[2] else None
        pi = torch.zeros(2, n_pairs, device=hidden.device)
        losses, rewards = [], []
        # Chunks sized for the device, logits in the dtype the path's row ops read (as linear_logprobs).
        plan = chunk_plan(pos.numel(), weight.shape[0], weight.dtype, hidden.device, opts.backend, cpu_bytes=CHUNK_BYTES)
        for rows, p0, p1 in _chunks_of_pairs(pair_t, n_pairs, plan.rows):
            h = hidden[pos[rows]]
            yc, pc, rc = y[rows], pair_t[rows] - p0, role_t[rows]
            # 1. The chunk's logits, reduced to per-token log-probs, then per-sequence sums.
            z = chunk_logits(h, weight, bias, plan.logits_dtype).unsqueeze(0)
            if opts.backend == "torch":
                logp, row_sums = _logp_in_place(z[0], yc, opts.temperature)
            else:
                logp, norm, _ = row_stats(z, yc.unsqueeze(0), opts, with_entropy=False)
                logp = logp[0]
            sums = torch.zeros(2, p1 - p0, device=z.device).index_put_((rc, pc), logp, accumulate=True)
            sums.requires_grad_()
            # 2. The chunk's pairs' losses (their share of the batch mean), its share of the NLL,
            #    and their gradient with respect to the per-sequence sums.
            with torch.enable_grad():
                pi_c = sums / denom[:, p0:p1]
                out = preference_loss(pi_c[0], pi_c[1], ref[0, p0:p1], ref[1, p0:p1], **loss_kw["loss"])
                nll_c = -sums[0].sum() * nll_scale
                (g_sums,) = torch.autograd.grad(out[0].sum() / n_pairs + loss_kw["nll_coef"] * nll_c, sums)
            pi[:, p0:p1] = pi_c.detach()
            nll += nll_c.detach()
            losses.append(out[0].detach())
            rewards.append(torch.stack(out[1:]))
            # 3. Logits -> dloss/dlogits in place, then the two gradient matmuls.
            g_t = g_sums[rc, pc]
            if opts.backend == "torch":
                _grad_in_place(z[0], yc, row_sums, g_t, opts.temperature)
            else:
                row_grad(z, z, yc.unsqueeze(0), norm, None, g_t.unsqueeze(0), None, opts)
            d = z[0].to(weight.dtype)  # no copy on the Triton path: the logits are in that dtype
            if grad_h is not None:
                grad_h.index_add_(0, pos[rows], (d @ weight).float())
            if grad_w is not None:
                _add_weight_grad(grad_w, d, h)
            if grad_b is not None:
                grad_b += z[0].sum(0, dtype=torch.float32)
            del z, d  # free this chunk's logits before the next chunk's exist
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = torch.cat(losses).sum() / n_pairs + loss_kw["nll_coef"] * nll
        losses, rewards = torch.cat(losses), torch.cat(rewards, dim=1)
        ctx.mark_non_differentiable(losses, rewards, pi, nll)
        return loss, losses, rewards, pi, nll

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        # Scale in place: a second [V, H] weight gradient would double the peak memory.
        grads = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):
            if g is not None and grad_loss.item() != 1.0:
                g.mul_(grad_loss)
            grads.append(None if g is None else g.to(dtype))
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None)


def fused_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    seq_index: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    average_log_prob: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str | None = None,
    nll_coef: float = 0.0,
    **loss_options: float | torch.Tensor,
) -> PreferenceLossOutput:
    """From hidden states of a packed batch to the preference loss; see the module docstring.

    ``hidden [N, H]``, ``weight [V, H]``, ``labels [N]``, the layout (``seq_index [N]`` or
    ``cu_seqlens [S+1]``), ``chosen``/``rejected [P]`` sequence indices, reference log-probs
    ``[P]`` (computed the same way: sums, or means with ``average_log_prob``; not used by
    ``orpo`` and ``simpo``). ``nll_coef`` weighs the chosen completions' token-mean NLL (CPO's
    ``cpo_alpha``, 1 for ORPO). Extra keyword options (``discopop_tau``, ``bco_delta``,
    ``simpo_gamma``) go to ``preference_loss``. Returns a ``PreferenceLossOutput``; only ``loss``
    carries gradients.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N, H] and [V, H]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [N] = [{hidden.shape[0]}]")
    seq_t, cu = packed_layout(labels, seq_index, cu_seqlens)
    fused_head = head_choice(hidden.device, backend)[0] == "fused"  # the lm_head as one Triton kernel
    opts = make_options(hidden.device, ignore_index, temperature, None, None if backend == "fused" else backend)
    check_labels(labels, weight.shape[0], opts.ignore_index)
    pair_t, role_t = _pair_layout(seq_t, cu.numel() - 1, chosen, rejected)
    loss_kw = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, reference_free=reference_free, **loss_options)

    n_seq, n_pairs = cu.numel() - 1, chosen.numel()
    reference_free = reference_free or loss_type in REFERENCE_FREE_LOSS_TYPES
    if not reference_free:
        for name, r in (("reference_chosen_logps", reference_chosen_logps), ("reference_rejected_logps", reference_rejected_logps)):
            if r is None or r.shape != (n_pairs,):
                raise ValueError(f"{name} must be [P] = [{n_pairs}] unless reference_free=True, got {None if r is None else tuple(r.shape)}")
    # Only the loss positions of paired sequences go through the lm_head.
    pos = ((labels != opts.ignore_index) & (pair_t >= 0)).nonzero()[:, 0]

    if loss_type in COUPLED_LOSS_TYPES or opts.backend == "reference" or fused_head:
        # Two passes: every pair's log-probs first (the fused lm_head's too), then the loss
        # through autograd (coupled losses need every pair's log-probs before any gradient).
        head = "fused" if fused_head else opts.backend
        logp = linear_logprobs(hidden[pos], weight, labels[pos], bias, ignore_index, temperature, backend=head)
        sums = torch.zeros(n_seq, device=hidden.device).index_add(0, seq_t[pos], logp)
        counts = torch.bincount(seq_t[pos], minlength=n_seq)
        pi = sums / counts.clamp(min=1) if average_log_prob else sums
        pi_c, pi_r = pi[chosen.long()], pi[rejected.long()]
        losses, r_c, r_r = preference_loss(pi_c, pi_r, reference_chosen_logps, reference_rejected_logps, **loss_kw)
        nll = -sums[chosen.long()].sum() / counts[chosen.long()].sum().clamp(min=1)
        loss = losses.mean() + nll_coef * nll if nll_coef else losses.mean()
        return PreferenceLossOutput(loss, losses.detach(), r_c, r_r, pi_c.detach(), pi_r.detach(), nll.detach())

    # One pass: log-probs, loss and gradients together.
    if reference_free:
        ref = torch.zeros(2, n_pairs, device=hidden.device)
    else:
        ref = torch.stack((reference_chosen_logps, reference_rejected_logps)).float().to(hidden.device)
    loss_kw = {"average_log_prob": average_log_prob, "nll_coef": nll_coef, "loss": loss_kw}
    loss, losses, rewards, pi, nll = _FusedSeparable.apply(
        hidden, weight, bias, pos, labels[pos], pair_t[pos], role_t[pos], ref, opts, loss_kw
    )
    return PreferenceLossOutput(loss, losses, rewards[0], rewards[1], pi[0], pi[1], nll)
