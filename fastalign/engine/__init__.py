"""The engine: one training loop, optimizer and precision, DeepSpeed, checkpoints, logging."""

from .config import TrainingConfig
from .engine import Engine
from .trainer import Trainer

__all__ = ["Engine", "Trainer", "TrainingConfig"]
