"""The algorithms, each a Config and a Trainer on the packed core."""

from .sft import SFTConfig, SFTTrainer

__all__ = ["SFTConfig", "SFTTrainer"]
