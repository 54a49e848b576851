"""PPO's options: ``PPOConfig`` (TRL 0.7.10's names and defaults on the engine's options) and the
``LengthSampler`` that draws a ``max_new_tokens`` per generation batch."""

from __future__ import annotations

import random
from dataclasses import dataclass

from fastalign.engine import TrainingConfig

KL_PENALTIES = ("kl", "abs", "mse", "full")


@dataclass
class PPOConfig(TrainingConfig):
    """TRL 0.7.10's ``PPOConfig`` knobs (same names and defaults) on top of the engine's options.

    A PPO step takes ``batch_size`` (query, response, score) samples, runs ``ppo_epochs`` passes
    over them in shuffled mini-batches of ``mini_batch_size``, and steps the optimizer every
    ``gradient_accumulation_steps`` mini-batches.
    """

    learning_rate: float = 1e-5
    max_grad_norm: float | None = None
    seed: int = 0
    steps: int = 20000  # samples over the whole run (TRL's meaning): steps / batch_size PPO steps
    # KL penalty: adaptive (Ziegler et al.) or fixed coefficient, and its per-token estimator.
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    kl_penalty: str = "kl"
    target: float = 6.0
    horizon: float = 10000.0
    # Advantages and the loss.
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    # Batching.
    batch_size: int = 256
    mini_batch_size: int = 1
    ppo_epochs: int = 4
    # Guards.
    early_stopping: bool = False
    target_kl: float = 1.0  # with early_stopping: stop the epoch once the policy KL exceeds 1.5 x this
    ratio_threshold: float = 10.0  # skip a mini-batch whose mean ratio exceeds this
    # Scores.
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.kl_penalty not in KL_PENALTIES:
            raise ValueError(f"kl_penalty must be one of {KL_PENALTIES}, got {self.kl_penalty!r}")
        backward = self.mini_batch_size * self.gradient_accumulation_steps
        if self.mini_batch_size < 1 or self.batch_size < 1 or self.batch_size % backward:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size x "
                             f"gradient_accumulation_steps ({self.mini_batch_size} x {self.gradient_accumulation_steps})")
        checks = {"ppo_epochs": self.ppo_epochs >= 1, "gamma": 0 <= self.gamma <= 1, "lam": 0 <= self.lam <= 1,
                  "cliprange": self.cliprange > 0, "cliprange_value": self.cliprange_value > 0,
                  "init_kl_coef": self.init_kl_coef >= 0, "target_kl": self.target_kl > 0,
                  "score_clip": self.score_clip is None or self.score_clip > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))
        if self.use_score_norm and not self.use_score_scaling:
            raise ValueError("use_score_norm centres scores as part of score scaling: set use_score_scaling=True too")

    @property
    def backward_batch_size(self) -> int:
        """Samples per optimizer step."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    @property
    def total_ppo_epochs(self) -> int:
        """PPO steps over the run: ``ceil(steps / batch_size)``."""
        return -(-self.steps // self.batch_size)


class LengthSampler:
    """A random ``max_new_tokens`` per generation batch: uniform over ``[min_value, max_value)``."""

    def __init__(self, min_value: int, max_value: int):
        if not 0 < min_value < max_value:
            raise ValueError(f"LengthSampler needs 0 < min_value < max_value, got {min_value}, {max_value}")
        self.values = list(range(min_value, max_value))
        self.longest = max_value - 1

    def __call__(self) -> int:
        return random.choice(self.values)
