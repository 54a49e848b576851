"""The clipped PPO loss (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"), TRL 0.7.10's.

Per token, with mask ``m``, old and new log-probs ``lp_old``, ``lp``, advantages ``A``, returns
``R``, rollout values ``v`` and new value predictions ``v'``, ``eps = cliprange``,
``eps_v = cliprange_value``:

    ratio    = exp(lp - lp_old)
    pg_loss  = masked_mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), m)
    v'_clip  = clip(v', v - eps_v, v + eps_v)
    vf_loss  = 0.5 masked_mean(max((v' - R)^2, (v'_clip - R)^2), m)

returned as ``(pg_loss, vf_coef * vf_loss, stats)``. When the masked mean ratio exceeds
``ratio_threshold`` the batch is considered broken: a warning, and both losses are multiplied by 0
(the graph is kept, so backward runs and yields zero gradients). Gradients flow to ``logprobs`` and
``vpreds``. Diagnostics, all detached, under TRL's flat names:

    approxkl = 0.5 masked_mean((lp - lp_old)^2)          policykl = masked_mean(lp_old - lp)
    clipfrac = masked_mean([-A clip(ratio) > -A ratio])  val/clipfrac = masked_mean([(v'_clip - R)^2 > (v' - R)^2])

A handful of elementwise ops and masked means over ``[B, T]``: plain torch on every device
(autograd's own backward is already one pass). Statistics are taken in at least fp32.
"""

from __future__ import annotations

import warnings

import torch

from .rl import masked_mean, masked_var


def _stat_var(values, mask):
    """``masked_var`` for a diagnostic: NaN, not an error, when the mask holds a single element."""
    if mask.sum().item() == 1:
        return torch.full((), float("nan"), dtype=torch.float32, device=values.device)
    return masked_var(values, mask)


def ppo_loss(
    old_logprobs: torch.Tensor,
    values: torch.Tensor,
    vpreds: torch.Tensor,
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    *,
    ratio_threshold: float = 10.0,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(pg_loss, vf_coef * vf_loss, stats)``: TRL 0.7.10's PPO loss over ``[B, T]`` tokens.

    Every tensor argument shares ``mask``'s shape; ``entropy`` (per-token entropy of the policy,
    optional) only feeds ``stats["policy/entropy"]``, which is absent without it. ``stats`` is flat
    and detached: ``loss/{policy,value,total}``, ``policy/{entropy,approxkl,policykl,clipfrac,
    advantages,advantages_mean,ratio}``, ``returns/{mean,var}``, ``val/{vpred,error,clipfrac,mean,
    var}``. Raises ValueError on an empty mask; the variances are NaN for a single-token mask.
    """
    named = dict(old_logprobs=old_logprobs, values=values, vpreds=vpreds, logprobs=logprobs,
                 advantages=advantages, returns=returns)
    if entropy is not None:
        named["entropy"] = entropy
    for name, x in named.items():
        if x.shape != mask.shape:
            raise ValueError(f"{name} {tuple(x.shape)} must match mask {tuple(mask.shape)}")
    if mask.sum().item() == 0:
        raise ValueError("ppo_loss: the mask is empty (no token has mask 1)")

    # 1. Value loss: the worse of the raw and the clipped prediction.
    vpredclipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)

    # 2. Policy loss: the pessimistic of the raw and the clipped surrogate.
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask)

    loss = pg_loss + vf_coef * vf_loss

    # 3. A ratio far from 1 on average means the batch is off-policy garbage: skip it, keep the graph.
    avg_ratio = masked_mean(ratio, mask).item()
    if avg_ratio > ratio_threshold:
        warnings.warn(
            f"The average ratio of batch ({avg_ratio:.2f}) exceeds threshold {ratio_threshold:.2f}. "
            "Skipping batch (the policy and value losses are multiplied by 0).",
            stacklevel=2,
        )
        pg_loss = pg_loss * 0.0
        vf_loss = vf_loss * 0.0
        loss = loss * 0.0

    # 4. Diagnostics, detached.
    with torch.no_grad():
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": vf_loss.detach(),
            "loss/total": loss.detach(),
        }
        if entropy is not None:
            stats["policy/entropy"] = masked_mean(entropy, mask)
        stats.update({
            "policy/approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),
            "policy/policykl": masked_mean(old_logprobs - logprobs, mask),
            "policy/clipfrac": pg_clipfrac.detach(),
            "policy/advantages": advantages.detach(),
            "policy/advantages_mean": masked_mean(advantages, mask),
            "policy/ratio": ratio.detach(),
            "returns/mean": masked_mean(returns, mask),
            "returns/var": _stat_var(returns, mask),
            "val/vpred": masked_mean(vpreds, mask),
            "val/error": masked_mean((vpreds - returns) ** 2, mask),
            "val/clipfrac": vf_clipfrac.detach(),
            "val/mean": masked_mean(values, mask),
            "val/var": _stat_var(values, mask),
        })
    return pg_loss, vf_coef * vf_loss, stats
