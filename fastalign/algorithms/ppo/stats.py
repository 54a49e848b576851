"""PPO's step statistics (TRL 0.7.10's names), and which of them the bar shows and which are arrays."""

from __future__ import annotations

import warnings

import torch

from fastalign.engine import distributed
from fastalign.kernels import segment_sum
from fastalign.kernels.rl import masked_mean

from .rollout import Rollout

BAR_KEYS = ("env/reward_mean", "objective/kl", "objective/kl_coef")
SCALAR_ARRAYS = ("objective/kl_dist", "tokens/queries_dist", "tokens/responses_dist", "ppo/policy/advantages",
                 "ppo/policy/ratio", "env/reward_dist")


def std(x: torch.Tensor) -> float:
    """Unbiased standard deviation; 0 for a single value."""
    return float(x.std()) if x.numel() > 1 else 0.0


def step_stats(r: Rollout, raw: torch.Tensor, mini_stats: list[dict], epochs: int, *, device: torch.device, world_size: int,
               kl_coef: float, learning_rate: float) -> dict:
    """A PPO step's stats under TRL's names: scalars averaged over the processes, scores over all
    of theirs (``raw``: every process's raw scores, gathered), distributions as 1-D arrays."""
    mask = r.mask
    kl_per_sample = segment_sum(r.kls * mask, cu_seqlens=r.cu)
    entropy = segment_sum(-r.logprobs * mask, cu_seqlens=r.cu)
    q_len = torch.tensor([len(q) for q in r.queries], dtype=torch.float32)
    a_len = torch.tensor([len(a) for a in r.responses], dtype=torch.float32)
    scalars = {
        "objective/kl": kl_per_sample.mean(), "objective/entropy": entropy.mean(),
        "ppo/mean_non_score_reward": masked_mean(r.non_score_rewards, mask),
        "tokens/queries_len_mean": q_len.mean(), "tokens/queries_len_std": std(q_len),
        "tokens/responses_len_mean": a_len.mean(), "tokens/responses_len_std": std(a_len),
    }
    for key in mini_stats[0]:
        if key not in ("policy/advantages", "policy/ratio"):
            scalars[f"ppo/{key}"] = torch.stack([torch.as_tensor(s[key]).float() for s in mini_stats]).mean()
    names = sorted(scalars)
    values = distributed.all_reduce_sum([float(scalars[k]) for k in names], device)
    stats = {k: v / world_size for k, v in zip(names, values)}
    # Scores: statistics over every process's (the raw ones come gathered already).
    scaled = torch.tensor(distributed.all_gather_floats(r.scores.tolist(), device))
    stats["ppo/mean_scores"], stats["ppo/std_scores"] = float(scaled.mean()), std(scaled)
    stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
    stats["objective/kl_coef"] = kl_coef
    stats["ppo/learning_rate"] = learning_rate
    stats["ppo/epochs"] = epochs
    stats["env/reward_mean"] = float(raw.mean())
    stats["env/reward_std"] = std(raw)
    if stats["objective/kl"] < -1.0:
        warnings.warn(f"the KL estimate is negative ({stats['objective/kl']:.2f}): sampling is probably not from "
                      "the policy (check the generation kwargs: no top_k/top_p/min_length truncation)", stacklevel=3)
    stats.update({
        "objective/kl_dist": kl_per_sample.cpu().numpy(), "tokens/queries_dist": q_len.numpy(),
        "tokens/responses_dist": a_len.numpy(), "env/reward_dist": raw.cpu().numpy(),
        "ppo/policy/advantages": torch.cat([s["policy/advantages"].flatten() for s in mini_stats]).cpu().numpy(),
        "ppo/policy/ratio": torch.cat([s["policy/ratio"].flatten() for s in mini_stats]).cpu().numpy(),
    })
    return stats
