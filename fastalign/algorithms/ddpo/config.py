"""DDPO's options: ``DDPOConfig`` (TRL 0.7.10's names and defaults, plus fastalign's run options)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class DDPOConfig:
    """TRL 0.7.10's ``DDPOConfig`` options (same names and defaults), plus fastalign's run options.

    An epoch samples ``sample_batch_size x sample_num_batches_per_epoch`` images; an optimizer
    step covers ``train_batch_size x train_gradient_accumulation_steps`` of them, each at
    ``int(sample_num_steps x train_timestep_fraction)`` timesteps.
    """

    output_dir: str = "runs/ddpo"
    seed: int = 0
    num_epochs: int = 100
    save_freq: int = 1  # epochs between checkpoints
    num_checkpoint_limit: int = 5
    mixed_precision: str = "fp16"  # "no", "fp16" or "bf16"
    allow_tf32: bool = True
    resume_from: str | bool = ""  # a checkpoint folder, or True: the latest in output_dir
    overwrite_output_dir: bool = False  # True: a new run deletes another run's checkpoints in output_dir
    # Sampling.
    sample_num_steps: int = 50
    sample_eta: float = 1.0
    sample_guidance_scale: float = 5.0
    sample_batch_size: int = 1
    sample_num_batches_per_epoch: int = 2
    negative_prompts: str = ""
    # Training.
    train_batch_size: int = 1
    train_learning_rate: float = 3e-4
    train_adam_beta1: float = 0.9
    train_adam_beta2: float = 0.999
    train_adam_weight_decay: float = 1e-4
    train_adam_epsilon: float = 1e-8
    train_gradient_accumulation_steps: int = 1
    train_max_grad_norm: float = 1.0
    train_num_inner_epochs: int = 1
    train_cfg: bool = True
    train_adv_clip_max: float = 5.0
    train_clip_range: float = 1e-4
    train_timestep_fraction: float = 1.0
    # Advantages.
    per_prompt_stat_tracking: bool = False
    per_prompt_stat_tracking_buffer_size: int = 16
    per_prompt_stat_tracking_min_count: int = 16
    # Rewards.
    async_reward_computation: bool = False
    max_workers: int = 2
    # The trained weights.
    use_lora: bool = True
    lora_rank: int = 4
    # Logging.
    report_to: tuple = ()
    disable_tqdm: bool = False

    def __post_init__(self):
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {sorted(PRECISIONS)}, got {self.mixed_precision!r}")
        checks = {
            "num_epochs": self.num_epochs >= 1, "save_freq": self.save_freq >= 1,
            "sample_num_steps": self.sample_num_steps >= 1, "sample_eta": self.sample_eta > 0,
            "sample_batch_size": self.sample_batch_size >= 1, "sample_num_batches_per_epoch": self.sample_num_batches_per_epoch >= 1,
            "train_batch_size": self.train_batch_size >= 1, "train_learning_rate": self.train_learning_rate >= 0,
            "train_gradient_accumulation_steps": self.train_gradient_accumulation_steps >= 1,
            "train_num_inner_epochs": self.train_num_inner_epochs >= 1, "train_clip_range": self.train_clip_range > 0,
            "train_adv_clip_max": self.train_adv_clip_max > 0,
            "train_timestep_fraction": 0 < self.train_timestep_fraction <= 1 and self.num_train_timesteps >= 1,
            "lora_rank": self.lora_rank >= 1, "max_workers": self.max_workers >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))
        if self.sample_batch_size % self.train_batch_size:
            raise ValueError(f"sample_batch_size ({self.sample_batch_size}) must be a multiple of train_batch_size "
                             f"({self.train_batch_size})")
        if self.samples_per_epoch % self.samples_per_optimizer_step:
            raise ValueError(
                f"an epoch's {self.samples_per_epoch} samples (sample_batch_size x sample_num_batches_per_epoch) must "
                f"be a multiple of the {self.samples_per_optimizer_step} of an optimizer step (train_batch_size x "
                "train_gradient_accumulation_steps)")
        if not self.train_cfg and self.sample_guidance_scale > 1:
            raise ValueError(f"train_cfg=False with sample_guidance_scale={self.sample_guidance_scale}: samples drawn "
                             "with guidance would be trained without it; set train_cfg=True or the scale to 1")
        if isinstance(self.report_to, str):
            self.report_to = () if self.report_to in ("none", "") else (self.report_to,)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sample_num_steps * self.train_timestep_fraction)

    @property
    def samples_per_epoch(self) -> int:
        return self.sample_batch_size * self.sample_num_batches_per_epoch

    @property
    def samples_per_optimizer_step(self) -> int:
        return self.train_batch_size * self.train_gradient_accumulation_steps

    @property
    def optimizer_steps_per_epoch(self) -> int:
        return self.train_num_inner_epochs * self.samples_per_epoch // self.samples_per_optimizer_step
