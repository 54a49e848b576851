"""The algorithms, each a Config and a Trainer on the packed core."""

from .ddpo import DDPOConfig, DDPOTrainer
from .dpo import DPOConfig, DPOTrainer
from .iterative_sft import IterativeSFTConfig, IterativeSFTTrainer
from .ppo import LengthSampler, PPOConfig, PPOTrainer, create_reference_model
from .reward import RewardConfig, RewardTrainer
from .sft import SFTConfig, SFTTrainer

__all__ = ["DDPOConfig", "DDPOTrainer", "DPOConfig", "DPOTrainer", "IterativeSFTConfig", "IterativeSFTTrainer", "LengthSampler", "PPOConfig", "PPOTrainer", "create_reference_model", "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer"]
