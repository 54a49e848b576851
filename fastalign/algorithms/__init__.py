"""The algorithms, each a Config and a Trainer on the packed core."""

from .dpo import DPOConfig, DPOTrainer
from .ppo import LengthSampler, PPOConfig, PPOTrainer, create_reference_model
from .reward import RewardConfig, RewardTrainer
from .sft import SFTConfig, SFTTrainer

__all__ = ["DPOConfig", "DPOTrainer", "LengthSampler", "PPOConfig", "PPOTrainer", "create_reference_model", "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer"]
