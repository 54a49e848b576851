"""The small statistics of RL training: masked moments, whitening, KL controllers, score scaling.

TRL 0.7.10 semantics, written out (``m`` a 0/1 mask, ``n = sum m``):

    masked_mean(x, m)   = sum m x / n                                   (over ``axis`` when given)
    masked_var(x, m)    = masked_mean((x - mu)^2, m) * n / (n - 1)      (Bessel's correction, unbiased)
    masked_whiten(x, m) = (x - mu) / sqrt(var + 1e-8)                   (+ mu again if not shift_mean)

The adaptive KL controller (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 2.2) moves the KL coefficient beta towards a target KL:

    e_t    = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta' = beta * (1 + e_t * n_steps / horizon)

``RunningMoments`` keeps the mean and standard deviation of every score seen so far, merging each
batch with the parallel-variance formula (Chan et al. 1979); ``PerPromptStatTracker`` normalises
rewards per prompt (DDPO). None of this is a kernel: these are a few reductions over small tensors,
plain torch (or numpy where TRL uses numpy) on every device. Statistics are taken in at least fp32.

The per-token math lives next door: ``kl.py`` (KL penalties, reward shaping), ``gae.py``
(advantages), ``ppo.py`` (the clipped PPO loss).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch


def _check_mask(values: torch.Tensor, mask: torch.Tensor, what: str = "values") -> None:
    if mask.shape != values.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match {what} {tuple(values.shape)}")


def _stat_dtype(values: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, the input's own dtype for fp32/fp64."""
    return torch.promote_types(values.dtype, torch.float32) if values.dtype.is_floating_point else torch.float32


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """``sum(values * mask) / sum(mask)``, over everything or over ``axis``.

    An empty mask gives NaN (0/0), as in TRL 0.7.10; ``masked_var`` is where an empty mask raises.
    """
    _check_mask(values, mask)
    x = values.to(_stat_dtype(values))
    m = mask.to(x.dtype)
    if axis is None:
        return (x * m).sum() / m.sum()
    return (x * m).sum(dim=axis) / m.sum(dim=axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` where ``mask`` is set; unbiased (``n / (n - 1)``) by default.

    Raises ValueError when the mask is empty, and, if unbiased, when it holds one element
    (Bessel's correction divides by ``n - 1 = 0`` there).
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values.to(mean.dtype) - mean) ** 2, mask)
    if unbiased:
        n = mask.to(mean.dtype).sum()
        count = n.item()
        if count == 0:
            raise ValueError("masked_var: the mask is empty (no element has mask 1); the variance is undefined")
        if count == 1:
            raise ValueError("masked_var: the mask holds one element; the unbiased variance divides by n - 1 = 0")
        var = var * (n / (n - 1))
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` with masked (unbiased) statistics.

    Applied to every position, masked or not; with ``shift_mean=False`` the mean is added back, so
    only the scale changes.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values.to(mean.dtype) - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


class AdaptiveKLController:
    """KL coefficient that tracks a target KL: ``value *= 1 + clip(kl/target - 1, ±0.2) * n_steps/horizon``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if not target > 0:
            raise ValueError(f"AdaptiveKLController: target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"AdaptiveKLController: horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current: float, n_steps: int) -> None:
        proportional_error = min(max(float(current) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> None:
        pass


class RunningMoments:
    """Running mean and standard deviation of every value passed to ``update`` (score scaling).

    Each batch is merged with the parallel-variance formula: with ``delta = mean_batch - mean``
    and ``tot = count + n``,

        mean' = mean + delta * n / tot
        var'  = (var * count + delta^2 * count * n / tot + var_batch * n) / tot     (population)
        std'  = sqrt(var' * tot / (tot - 1))                                         (unbiased)

    ``count`` starts at 1e-24 so that the first batch's statistics replace the initial ``(0, 1)``.
    State is kept as Python floats, computed in float64. Single process: no cross-rank reduction.
    """

    def __init__(self):
        self.mean = 0.0
        self.std = 1.0
        self.var = 1.0
        self.count = 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Merge ``xs``; return this batch's ``(mean, unbiased std)`` (std NaN for one element)."""
        xs = torch.as_tensor(xs)
        n = xs.numel()
        if n == 0:
            raise ValueError("RunningMoments.update: xs is empty")
        xs_var, xs_mean = torch.var_mean(xs.detach().double(), unbiased=False)
        xs_var, xs_mean = xs_var.item(), xs_mean.item()

        delta = xs_mean - self.mean
        tot = self.count + n
        new_sum = xs_var * n
        # The old sum of squares, re-centred on the merged mean.
        old_sum = self.var * self.count + delta**2 * self.count * n / tot
        self.mean += delta * n / tot
        self.var = (old_sum + new_sum) / tot
        self.std = math.sqrt(self.var * tot / (tot - 1))
        self.count = tot
        return xs_mean, (math.sqrt(xs_var * n / (n - 1)) if n > 1 else float("nan"))


class PerPromptStatTracker:
    """Per-prompt reward normalisation: ``advantage = (r - mean) / (std + 1e-6)``.

    Each prompt keeps its last ``buffer_size`` rewards. While a prompt's buffer holds fewer than
    ``min_count`` rewards, its rewards are normalised with the statistics of the whole batch
    passed to ``update``; afterwards with those of its buffer (numpy's population std).
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size is not None and buffer_size < 1:
            raise ValueError(f"PerPromptStatTracker: buffer_size must be >= 1, got {buffer_size}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict = {}

    def update(self, prompts: Sequence[str] | np.ndarray, rewards: torch.Tensor | np.ndarray) -> np.ndarray:
        """Advantages (float64, one per reward) for ``rewards`` given by ``prompts``."""
        if isinstance(rewards, torch.Tensor):
            rewards = rewards.detach().cpu().numpy()
        prompts = np.asarray(prompts)
        rewards = np.asarray(rewards, dtype=np.float64)
        if prompts.shape != rewards.shape or prompts.ndim != 1:
            raise ValueError(
                f"prompts {prompts.shape} and rewards {rewards.shape} must be 1-D and of the same length"
            )
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            here = prompts == prompt
            prompt_rewards = rewards[here]
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(prompt_rewards)
            source = rewards if len(buffer) < self.min_count else np.asarray(buffer)
            mean, std = np.mean(source), np.std(source) + 1e-6
            advantages[here] = (prompt_rewards - mean) / std
        return advantages

    def get_stats(self) -> dict:
        return {k: {"mean": np.mean(v), "std": np.std(v), "count": len(v)} for k, v in self.stats.items()}
