"""PPO's options: ``PPOConfig`` (TRL 0.7.10's names and defaults on the engine's options) and the
``LengthSampler`` that draws a ``max_new_tokens`` per generation batch."""

from __future__ import annotations

import random
from dataclasses import dataclass

from fastalign.engine import TrainingConfig
from fastalign.errors import ConfigError
from fastalign.options import option

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
    steps: int = option(20000, "samples over the whole run (TRL's meaning): steps / batch_size PPO steps", ge=1)
    # KL penalty: adaptive (Ziegler et al.) or fixed coefficient, and its per-token estimator.
    adap_kl_ctrl: bool = option(True, "adapt the KL coefficient toward target (false: fixed init_kl_coef)")
    init_kl_coef: float = option(0.2, "the KL penalty's first (or fixed) coefficient", ge=0)
    kl_penalty: str = option("kl", "the per-token KL estimator (full: exact over the vocabulary)",
                             choices=KL_PENALTIES)
    target: float = option(6.0, "the KL (nats per answer) the adaptive coefficient steers to", gt=0)
    horizon: float = option(10000.0, "the adaptive controller's horizon, in samples", gt=0)
    # Advantages and the loss.
    gamma: float = option(1.0, "the discount of rewards along the answer", ge=0, le=1)
    lam: float = option(0.95, "GAE's lambda", ge=0, le=1)
    cliprange: float = option(0.2, "the policy ratio's clip range", gt=0)
    cliprange_value: float = option(0.2, "the value prediction's clip range", gt=0)
    vf_coef: float = option(0.1, "the value loss's weight", ge=0)
    whiten_rewards: bool = option(False, "whiten the shaped rewards of each batch")
    # Batching.
    batch_size: int = option(256, "samples per PPO step (per process)", ge=1)
    mini_batch_size: int = option(1, "samples per mini-batch", ge=1)
    ppo_epochs: int = option(4, "passes over each step's samples", ge=1)
    # Guards.
    early_stopping: bool = option(False, "stop a step's passes once the policy KL exceeds 1.5 x target_kl")
    target_kl: float = option(1.0, "the KL early_stopping stops at (times 1.5)", gt=0)
    ratio_threshold: float = option(10.0, "skip a mini-batch whose mean policy ratio exceeds this", gt=0)
    # Scores.
    use_score_scaling: bool = option(False, "divide scores by their running standard deviation")
    use_score_norm: bool = option(False, "with use_score_scaling: also subtract their running mean")
    score_clip: float | None = option(None, "clip scores to [-score_clip, score_clip] (null: no clipping)", gt=0)

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size % self.backward_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size x "
                              f"gradient_accumulation_steps ({self.mini_batch_size} x {self.gradient_accumulation_steps})")
        if self.use_score_norm and not self.use_score_scaling:
            raise ConfigError("use_score_norm centres scores as part of score scaling: set use_score_scaling=True too")

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
