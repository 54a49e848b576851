"""The algorithms, each a Config and a Trainer on the packed core; ``ALGORITHMS``: those the
``fastalign`` command trains, by name (each trainer declares its run keys and how it launches)."""

from .cpo import CPOConfig, CPOTrainer, SimPOConfig, SimPOTrainer
from .ddpo import DDPOConfig, DDPOTrainer
from .dpo import DPOConfig, DPOTrainer
from .grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from .iterative_sft import IterativeSFTConfig, IterativeSFTTrainer
from .kto import KTOConfig, KTOTrainer
from .orpo import ORPOConfig, ORPOTrainer
from .ppo import LengthSampler, PPOConfig, PPOTrainer, create_reference_model
from .reward import RewardConfig, RewardTrainer
from .sft import SFTConfig, SFTTrainer

__all__ = ["ALGORITHMS", "DDPOConfig", "DDPOTrainer", "DPOConfig", "DPOTrainer", "IterativeSFTConfig", "IterativeSFTTrainer", "LengthSampler", "PPOConfig", "PPOTrainer", "create_reference_model", "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer"]
__all__ += ["CPOConfig", "CPOTrainer", "SimPOConfig", "SimPOTrainer", "ORPOConfig", "ORPOTrainer", "KTOConfig",
            "KTOTrainer"]

ALGORITHMS = {"sft": (SFTConfig, SFTTrainer), "reward": (RewardConfig, RewardTrainer), "dpo": (DPOConfig, DPOTrainer),
              "ppo": (PPOConfig, PPOTrainer), "ddpo": (DDPOConfig, DDPOTrainer)}
ALGORITHMS.update(orpo=(ORPOConfig, ORPOTrainer), cpo=(CPOConfig, CPOTrainer), simpo=(SimPOConfig, SimPOTrainer),
                  kto=(KTOConfig, KTOTrainer))
__all__ += ["GRPOConfig", "GRPOTrainer", "RLOOConfig", "RLOOTrainer"]
ALGORITHMS.update(grpo=(GRPOConfig, GRPOTrainer), rloo=(RLOOConfig, RLOOTrainer))
