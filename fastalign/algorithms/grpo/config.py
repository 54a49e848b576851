"""GRPO's and RLOO's options: TRL 1.16's names and defaults on the engine's options.

Batch sizes count completions, as in TRL: a process takes ``per_device_train_batch_size``
completions per micro-step, ``gradient_accumulation_steps`` micro-steps per optimizer step. One
generation samples ``generation_batch_size`` completions over all processes
(``generation_batch_size / num_generations`` prompts, ``num_generations`` completions each) and
serves ``steps_per_generation`` micro-steps, ``num_iterations`` times over. By default
``steps_per_generation = gradient_accumulation_steps``: one generation per optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastalign.engine import TrainingConfig, distributed
from fastalign.errors import ConfigError
from fastalign.kernels.grpo import GRPO_LOSS_TYPES, SCALE_REWARDS
from fastalign.options import option


@dataclass
class GroupConfig(TrainingConfig):
    """What GRPO and RLOO share: sampling groups of completions, their batching and the clipped
    ratio. Not trained on its own (``GRPOConfig``, ``RLOOConfig``)."""

    learning_rate: float = 1e-6
    # Batching, in completions.
    per_device_train_batch_size: int = option(8, "completions per process and micro step (packed into rows of at "
                                              "most max_tokens_per_batch tokens)", ge=1)
    num_generations: int = option(8, "completions sampled per prompt (the group)", ge=2)
    generation_batch_size: int | None = option(None, "completions per generation over all processes (null: "
                                               "per_device_train_batch_size x processes x steps_per_generation)", ge=1)
    steps_per_generation: int | None = option(None, "micro steps each generation serves (null: "
                                              "gradient_accumulation_steps)", ge=1)
    shuffle_dataset: bool = option(True, "shuffle the prompts every epoch")
    # Prompts and generation.
    max_prompt_length: int | None = option(None, "keep the last this many tokens of each prompt (null: the whole "
                                           "prompt; TRL before 0.25 cut at 512)", ge=1)
    max_completion_length: int = option(512, "new tokens at most per completion", ge=1)
    temperature: float = option(1.0, "sampling temperature (the log probabilities are taken at it too)", gt=0)
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens holding this probability", gt=0, le=1)
    top_k: int = option(0, "sample from the k most likely tokens (0: all)", ge=0)
    min_p: float | None = option(None, "drop tokens less likely than min_p x the most likely one (null: off)",
                                 ge=0, le=1)
    repetition_penalty: float = option(1.0, "penalty on tokens already in the prompt or completion (1: none)", gt=0)
    generation_kwargs: dict | None = option(None, "more model.generate options; they win over the ones above")
    ds3_gather_for_generation: bool = option(True, "ZeRO-3: gather the whole policy once per generation (false: "
                                             "layer by layer, every process in step; for models that do not fit)")
    disable_dropout: bool = option(False, "turn dropout off in the trained model")
    # The objective.
    beta: float = option(0.0, "KL coefficient to the reference (0: no reference model is built)", ge=0)
    num_iterations: int = option(1, "updates per generation (mu): each reuses it with the log probabilities of the policy "
                                 "that sampled it", ge=1)
    epsilon: float = option(0.2, "the ratio's lower clip: 1 - epsilon", ge=0, lt=1)
    epsilon_high: float | None = option(None, "the ratio's upper clip: 1 + epsilon_high (null: epsilon; DAPO "
                                        "suggests 0.28)", ge=0)
    reward_weights: list[float] | None = option(None, "one weight per reward function (null: all 1)")
    mask_truncated_completions: bool = option(False, "no loss on completions cut at max_completion_length")

    def __post_init__(self):
        super().__post_init__()
        if self.streaming:
            raise ConfigError("streaming is for sft, reward and dpo: GRPO and RLOO sample prompts from a data set "
                              "they can index")
        processes = distributed.world_size()
        per_step = self.per_device_train_batch_size * processes
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ConfigError("generation_batch_size and steps_per_generation cannot both be set")
        if self.generation_batch_size is None:
            self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
            self.generation_batch_size = per_step * self.steps_per_generation
        elif self.generation_batch_size % per_step:
            raise ConfigError(f"generation_batch_size ({self.generation_batch_size}) must be a multiple of "
                              f"per_device_train_batch_size x processes ({per_step})")
        else:
            self.steps_per_generation = self.generation_batch_size // per_step
        if self.generation_batch_size % self.num_generations:
            raise ConfigError(f"generation_batch_size ({self.generation_batch_size}) must be a multiple of "
                              f"num_generations ({self.num_generations}): every prompt gets its whole group")
        if self.reward_weights is not None and not self.reward_weights:
            raise ConfigError("reward_weights must hold one weight per reward function, or be null")

    @property
    def prompts_per_generation(self) -> int:
        """Prompts drawn per generation, over all processes."""
        return self.generation_batch_size // self.num_generations

    @property
    def generate_every(self) -> int:
        """Micro-steps between generations."""
        return self.steps_per_generation * self.num_iterations


@dataclass
class GRPOConfig(GroupConfig):
    """GRPO (Shao et al., "DeepSeekMath", 2024, arXiv:2402.03300): TRL 1.16's ``GRPOConfig`` names
    and defaults (``beta`` 0: no reference; ``loss_type`` dapo; ``scale_rewards`` group)."""

    scale_rewards: str = option("group", "divide advantages by the std of the group, of the batch, or none",
                                choices=SCALE_REWARDS)
    loss_type: str = option("dapo", "how token losses are averaged: grpo (per sequence, then over sequences), "
                            "bnpo (over each micro batch's tokens), dr_grpo (over sequences x max_completion_length), "
                            "dapo (over the generation's tokens)", choices=GRPO_LOSS_TYPES)


@dataclass
class RLOOConfig(GroupConfig):
    """RLOO (Ahmadian et al., "Back to Basics", 2024, arXiv:2402.14740): TRL 1.16's ``RLOOConfig``
    names and defaults (``num_generations`` 2, ``beta`` 0.05 in the reward)."""

    num_generations: int = 2
    beta: float = option(0.05, "KL coefficient: beta x the completion's summed log ratio to the reference is taken "
                         "from its reward (0: no reference model is built)", ge=0)
    normalize_advantages: bool = option(False, "normalise the advantages over each generation (mean 0, std 1)")
    reward_clip_range: list[float] | None = option(None, "clip rewards to [min, max] (null: no clipping)")

    def __post_init__(self):
        super().__post_init__()
        r = self.reward_clip_range
        if r is not None and (len(r) != 2 or r[0] > r[1]):
            raise ConfigError(f"reward_clip_range must be [min, max] with min <= max, got {r!r}")
