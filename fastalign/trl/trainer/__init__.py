"""``trl.trainer``: TRL 0.7.10's trainers and configs on fastalign's native trainers."""

from .dpo_trainer import DPOTrainer
from .iterative_sft_trainer import IterativeSFTTrainer
from .ppo_config import PPOConfig
from .ppo_trainer import PPOTrainer
from .reward_trainer import RewardConfig, RewardTrainer
from .sft_trainer import SFTTrainer
from .utils import (
    AdaptiveKLController,
    DataCollatorForCompletionOnlyLM,
    DPODataCollatorWithPadding,
    FixedKLController,
    PerPromptStatTracker,
    RewardDataCollatorWithPadding,
    RunningMoments,
    compute_accuracy,
    disable_dropout_in_model,
    exact_div,
    pad_to_length,
)


def __getattr__(name):  # DDPO needs diffusers only when used
    if name in ("DDPOConfig", "DDPOTrainer"):
        from . import ddpo_config, ddpo_trainer

        return getattr(ddpo_config if name == "DDPOConfig" else ddpo_trainer, name)
    from fastalign.trl import unsupported

    return unsupported(__name__, name)


__all__ = ["AdaptiveKLController", "DDPOConfig", "DDPOTrainer", "DPODataCollatorWithPadding", "DPOTrainer",
           "DataCollatorForCompletionOnlyLM", "FixedKLController", "IterativeSFTTrainer", "PPOConfig", "PPOTrainer",
           "PerPromptStatTracker", "RewardConfig", "RewardDataCollatorWithPadding", "RewardTrainer", "RunningMoments",
           "SFTTrainer", "compute_accuracy", "disable_dropout_in_model", "exact_div", "pad_to_length"]
