"""``trl.trainer.reward_config``: ``RewardConfig`` (defined with the trainer)."""

from .reward_trainer import RewardConfig

__all__ = ["RewardConfig"]
