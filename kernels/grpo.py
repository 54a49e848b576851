"""Group-relative policy optimisation: advantages from groups of completions, and the clipped loss.

A prompt gets ``G`` sampled completions; their rewards come as one flat ``[num_prompts * G]``
tensor, the completions of a prompt contiguous. A NaN reward marks a completion nothing could
score: it is left out of every mean and standard deviation, and its advantage is 0.

Advantages (std: the sample standard deviation, Bessel-corrected, over the non-NaN rewards):

    group_advantages   A_i = r_i - mean_g(r),   then / (std + 1e-4) with std = std_g(r) ("group"),
                       std of the whole batch ("batch"), or unscaled ("none")
                       GRPO, Shao et al. 2024, arXiv:2402.03300; "batch": PPO Lite, Liu et al. 2025,
                       arXiv:2508.08221; "none": Dr. GRPO, Liu et al. 2025, arXiv:2503.20783
    rloo_advantages    A_i = r_i - mean_{j != i in g}(r_j) = r_i - (sum_g(r) - r_i) / (G - 1),
                       optionally normalised over the batch: (A - mean A) / (std A + 1e-4)
                       RLOO, Ahmadian et al. 2024, arXiv:2402.14740

A group whose rewards are all equal gets advantages 0 (its std is 0, the 1e-4 keeps it finite).

The loss, per completion token t of sequence s, with ratio rho_t = exp(logp_t - old_t):

    l_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t) + beta * k3_t,
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (KL estimate to the reference, >= 0)

(eps_high: DAPO's clip-higher, Yu et al. 2025, arXiv:2503.14476), aggregated over the mask by
``loss_type``:

    grpo      mean over sequences of (sum_t l_t / n_s)                  (an empty sequence counts 0)
    bnpo      sum_{s,t} l_t / sum_s n_s
    dr_grpo   sum_{s,t} l_t / (S * max_completion_length)
    dapo      sum_{s,t} l_t / num_items_in_batch   (the mask-1 tokens of the whole accumulated
              batch over every process; default: this batch's)

The values are those of TRL 1.16's GRPOTrainer per micro-batch, before its division by the
gradient accumulation steps (``grpo``, ``bnpo``, ``dr_grpo``); for ``dapo`` TRL divides by
``num_items_in_batch / processes * accumulation_steps / steps_per_generation``: pass that.

Two layouts, one computation: ``grpo_loss_packed`` takes flat ``[M]`` tokens with ``cu_seqlens``
(what a packed trainer holds), ``grpo_loss`` a padded ``[B, T]`` batch read as ``B`` sequences of
``T`` tokens. ``rloo_loss`` is TRL 1.16's RLOO objective, the same clipped ratio on sequence
log-probs (one "token" per sequence). Plain torch on every device: elementwise ops and segment
sums over per-token values that the log-prob kernels have already reduced from the vocabulary.
"""

from __future__ import annotations

import torch

from .preference import _f32
from .segments import check_cu_seqlens

SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# Added to a standard deviation before dividing by it.
STD_EPS = 1e-4


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation (Bessel) over the non-NaN entries; NaN where fewer than 2."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim)
    sq = torch.nansum((x - mean) ** 2, dim=dim)
    return torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.nan).sqrt()


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Checked rewards as ``[num_prompts, G]``, at least fp32."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be flat [num_prompts * G], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group size {group_size!r} must be an integer >= 1 dividing the {rewards.numel()} rewards")
    if torch.isinf(rewards).any():
        i = int(torch.isinf(rewards).nonzero()[0])
        raise ValueError(f"rewards[{i}] = {float(rewards[i])} is not finite (NaN marks an unscored completion)")
    return _f32(rewards).view(-1, group_size)


def _group_std(grouped: torch.Tensor) -> torch.Tensor:
    """Each group's std, repeated for its completions (0 for groups of one)."""
    if grouped.shape[1] == 1:
        return torch.zeros_like(grouped).flatten()
    return _nanstd(grouped, dim=1).repeat_interleave(grouped.shape[1])


def _scale_std(grouped: torch.Tensor, scale_rewards: str | bool) -> tuple[str, torch.Tensor]:
    """The scaling mode (TRL's True/False read as "group"/"none") and the std it uses per completion."""
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    if scale == "batch":
        flat = grouped.flatten()
        return scale, _nanstd(flat).expand_as(flat) if flat.numel() > 1 else torch.zeros_like(flat)
    return scale, _group_std(grouped)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str | bool = "group") -> torch.Tensor:
    """GRPO's advantages ``[num_prompts * G]``: each reward minus its group's mean, divided by the
    group's std (``"group"``), the batch's std (``"batch"``) or nothing (``"none"``), plus 1e-4.

    ``rewards`` is flat, each prompt's ``group_size`` completions contiguous, NaN for a completion
    that was not scored (left out of the statistics, advantage 0). Pass the rewards of every
    process: the groups and the batch std span them all. Not differentiable (a target).
    """
    grouped = _grouped(rewards, group_size).detach()
    scale, std = _scale_std(grouped, scale_rewards)
    advantages = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).flatten()
    if scale != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_advantages(rewards: torch.Tensor, k: int, normalize_advantages: bool = False) -> torch.Tensor:
    """RLOO's advantages ``[num_prompts * k]``: each reward minus the mean of the other scored
    completions of its prompt; with ``normalize_advantages``, then centred and divided by their
    std over the batch (plus 1e-4).

    ``rewards`` as for ``group_advantages`` (NaN: not scored, advantage 0; a completion with no
    scored sibling gets 0). TRL 1.16's RLOO folds its KL penalty into the rewards first:
    ``r - beta * sum_t (old_t - ref_t)`` per completion. Not differentiable (a target).
    """
    grouped = _grouped(rewards, k).detach()
    if k == 1:
        advantages = torch.zeros_like(grouped).flatten()
    else:
        others = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / ((~torch.isnan(grouped)).sum(1, keepdim=True) - 1)
        advantages = (grouped - others).flatten()
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (_nanstd(advantages) + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def group_reward_metrics(
    rewards: torch.Tensor, group_size: int, scale_rewards: str | bool = "group"
) -> dict[str, torch.Tensor]:
    """TRL's reward metrics of a batch: ``reward`` (mean), ``reward_std`` (std over the batch) and
    ``frac_reward_zero_std`` (the share of completions whose scaling std is 0: their group's, or
    the batch's with ``"batch"``); NaN rewards left out. RLOO logs them with ``"group"``."""
    grouped = _grouped(rewards, group_size).detach()
    _, std = _scale_std(grouped, scale_rewards)
    flat = grouped.flatten()
    return {
        "reward": torch.nanmean(flat),
        "reward_std": _nanstd(flat),
        "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean(),
    }


def _seq_sum(x: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    return torch.zeros(n_seq, dtype=x.dtype, device=x.device).index_add(0, seq, x)


def _masked_means(flags: dict[str, torch.Tensor], m: torch.Tensor, seq: torch.Tensor, n_seq: int) -> dict:
    """Each flag's mean over the mask's tokens, and per sequence (NaN for an empty one)."""
    count, seq_count = m.sum().clamp(min=1.0), _seq_sum(m, seq, n_seq)
    return {name: ((f * m).sum() / count, _seq_sum(f * m, seq, n_seq) / seq_count) for name, f in flags.items()}


def _nan_extreme(x: torch.Tensor, reduce) -> torch.Tensor:
    keep = x[~torch.isnan(x)]
    return reduce(keep) if keep.numel() else torch.full((), torch.nan, dtype=x.dtype, device=x.device)


def _clipped_objective(
    logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, adv: torch.Tensor, m: torch.Tensor,
    seq: torch.Tensor, n_seq: int, eps_low: float, eps_high: float, beta: float, loss_type: str,
    max_completion_length: int | None, num_items_in_batch: float | torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and metrics over flat checked tokens: ``m`` the 0/1 mask, ``seq`` each token's sequence."""
    keep = m != 0
    # 1. Ratio and clipped surrogate per token. Masked tokens hold no log-prob worth trusting
    #    (padding): zero their differences first, so an overflow there cannot turn into a NaN.
    log_ratio = (logp - old).masked_fill(~keep, 0.0)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    # 2. The k3 estimate of KL(pi || ref), exact in expectation under pi and never negative.
    if beta != 0.0:
        d = (ref - logp).masked_fill(~keep, 0.0)
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    # 3. Aggregate.
    total = (per_token * m).sum()
    if loss_type == "grpo":
        loss = (_seq_sum(per_token * m, seq, n_seq) / _seq_sum(m, seq, n_seq).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = total / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = total / (n_seq * max_completion_length)
    else:  # dapo
        n_items = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=m.dtype, device=m.device)
        loss = total / n_items.clamp(min=1.0)
    # 4. TRL's metrics: clip shares over the tokens, their extremes over sequences, the mean KL.
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        means = _masked_means({"low": low.to(m.dtype), "high": high.to(m.dtype), "region": (low | high).to(m.dtype)}, m, seq, n_seq)
        metrics = {
            "clip_ratio/low_mean": means["low"][0],
            "clip_ratio/high_mean": means["high"][0],
            "clip_ratio/region_mean": means["region"][0],
            "clip_ratio/low_min": _nan_extreme(means["low"][1], torch.min),
            "clip_ratio/high_max": _nan_extreme(means["high"][1], torch.max),
        }
        if beta != 0.0:
            metrics["kl"] = (kl * m).sum() / m.sum().clamp(min=1.0)
    return loss, metrics


def _check_options(loss_type, epsilon, epsilon_high, beta, ref, max_completion_length) -> tuple[float, float]:
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(GRPO_LOSS_TYPES)}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if not (0 <= epsilon < 1 and eps_high >= 0):
        raise ValueError(f"epsilon must be in [0, 1) and epsilon_high >= 0, got {epsilon} and {epsilon_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta != 0.0 and ref is None:
        raise ValueError("ref_logprobs are required when beta != 0 (beta = 0 drops the KL term)")
    if loss_type == "dr_grpo" and not (max_completion_length and max_completion_length > 0):
        raise ValueError(f"loss_type='dr_grpo' needs max_completion_length > 0, got {max_completion_length!r}")
    return epsilon, eps_high


def _same_shape(shape: torch.Size, **named: torch.Tensor | None) -> None:
    for name, t in named.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match logprobs {tuple(shape)}")


def _flat(logprobs, old_logprobs, ref_logprobs, mask, beta):
    """The per-token inputs as flat fp32 (at least) rows: the policy's log-probs, the old ones
    (the policy's, detached, when None), the reference's (None when beta = 0) and the 0/1 mask."""
    logp = _f32(logprobs).reshape(-1)
    old = logp.detach() if old_logprobs is None else old_logprobs.detach().to(logp).reshape(-1)
    ref = ref_logprobs.detach().to(logp).reshape(-1) if beta else None
    m = torch.ones_like(logp) if mask is None else mask.to(device=logp.device, dtype=logp.dtype).reshape(-1)
    return logp, old, ref, m


def grpo_loss_packed(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor | None = None, epsilon: float = 0.2,
    epsilon_high: float | None = None, beta: float = 0.04, loss_type: str = "grpo",
    max_completion_length: int | None = None, num_items_in_batch: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss over flat tokens: ``(loss, metrics)``; see the module docstring.

    ``logprobs [M]`` (the policy's, with gradients), ``old_logprobs [M]`` (the sampling policy's;
    None: ``logprobs`` detached, ratio 1), ``ref_logprobs [M]`` (None allowed when ``beta = 0``),
    ``advantages [S]`` one per sequence, ``cu_seqlens [S+1]`` (sequence ``s`` owns tokens
    ``cu_seqlens[s] <= t < cu_seqlens[s+1]``), ``mask [M]`` 0/1 (default: every token counts).
    ``epsilon_high`` defaults to ``epsilon``. ``metrics`` holds TRL's ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``clip_ratio/low_min``,
    ``clip_ratio/high_max`` and, when ``beta != 0``, ``kl`` (detached 0-d tensors, this batch's).
    """
    eps = _check_options(loss_type, epsilon, epsilon_high, beta, ref_logprobs, max_completion_length)
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be flat [M], got shape {tuple(logprobs.shape)}")
    _same_shape(logprobs.shape, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs if beta else None, mask=mask)
    check_cu_seqlens(cu_seqlens, logprobs.shape[0])
    n_seq = cu_seqlens.numel() - 1
    if n_seq < 1 or advantages.shape != (n_seq,):
        raise ValueError(f"advantages {tuple(advantages.shape)} must be one per sequence: [S] = [{n_seq}], S >= 1")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=logprobs.device, dtype=torch.long)
    seq = torch.repeat_interleave(torch.arange(n_seq, device=logprobs.device), lengths)
    logp, old, ref, m = _flat(logprobs, old_logprobs, ref_logprobs, mask, beta)
    adv = advantages.detach().to(logp)[seq]
    return _clipped_objective(logp, old, ref, adv, m, seq, n_seq, *eps, beta, loss_type, max_completion_length,
                              num_items_in_batch)


def grpo_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None,
    beta: float = 0.04, loss_type: str = "grpo", max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss over a padded batch: ``(loss, metrics)``, TRL 1.16's ``_compute_loss`` math.

    ``logprobs``, ``old_logprobs``, ``ref_logprobs`` and ``mask`` are ``[B, T]`` (the completion
    tokens; ``mask`` 0/1, any padding), ``advantages`` is ``[B]`` or per token ``[B, T]``. The rest
    as ``grpo_loss_packed``: the same computation, with row ``b`` as sequence ``b``.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    eps = _check_options(loss_type, epsilon, epsilon_high, beta, ref_logprobs, max_completion_length)
    _same_shape(logprobs.shape, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs if beta else None, mask=mask)
    B, T = logprobs.shape
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] = [{B}] or [B, T] = [{B}, {T}]")
    if B < 1:
        raise ValueError("logprobs must hold at least one sequence")
    logp, old, ref, m = _flat(logprobs, old_logprobs, ref_logprobs, mask, beta)
    adv = advantages.detach().to(logp)
    adv = (adv[:, None] if adv.dim() == 1 else adv).expand(B, T).reshape(-1)
    seq = torch.arange(B, device=logp.device).repeat_interleave(T)
    return _clipped_objective(logp, old, ref, adv, m, seq, B, *eps, beta, loss_type, max_completion_length,
                              num_items_in_batch)


def rloo_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL 1.16's RLOO objective: ``(loss, metrics)`` with
    ``loss = mean_s -min(rho_s A_s, clip(rho_s, 1 - eps_low, 1 + eps_high) A_s)``,
    ``rho_s = exp(logps_s - old_logps_s)`` on each completion's summed log-probs ``[S]``.

    ``metrics``: ``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean``, ``/low_min``,
    ``/high_max`` over the completions. The KL penalty lives in the rewards (``rloo_advantages``).
    """
    eps = _check_options("bnpo", epsilon, epsilon_high, 0.0, None, None)
    if logps.dim() != 1 or logps.numel() < 1:
        raise ValueError(f"logps must be [S], S >= 1, got shape {tuple(logps.shape)}")
    _same_shape(logps.shape, old_logps=old_logps, advantages=advantages)
    logp, old, _, ones = _flat(logps, old_logps, None, None, 0.0)
    seq = torch.arange(logp.numel(), device=logp.device)
    return _clipped_objective(logp, old, None, advantages.detach().to(logp), ones, seq, logp.numel(), *eps, 0.0, "bnpo",
                              None, None)
