"""DDPO's options: ``DDPOConfig`` (TRL 0.7.10's names and defaults, plus fastalign's run options)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.errors import ConfigError
from fastalign.options import check_fields, option

PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class DDPOConfig:
    """TRL 0.7.10's ``DDPOConfig`` options (same names and defaults), plus fastalign's run options.

    An epoch samples ``sample_batch_size x sample_num_batches_per_epoch`` images; an optimizer
    step covers ``train_batch_size x train_gradient_accumulation_steps`` of them, each at
    ``int(sample_num_steps x train_timestep_fraction)`` timesteps.
    """

    output_dir: str = option("runs/ddpo", "where checkpoints, metrics.jsonl, plots and the final pipeline go")
    seed: int = option(0, "seeds the noise, the shuffles and the timesteps", ge=0, le=2**32 - 1)
    num_epochs: int = option(100, "epochs of sampling then training", ge=1)
    save_freq: int = option(1, "epochs between checkpoints", ge=1)
    num_checkpoint_limit: int = option(5, "checkpoints kept, the oldest removed first", ge=1)
    mixed_precision: str = option("fp16", "the frozen text encoder's and VAE's dtype and the UNet's autocast",
                                  choices=tuple(PRECISIONS))
    allow_tf32: bool = option(True, "TF32 matmuls on Ampere or newer GPUs")
    resume_from: str | bool = option("", "a checkpoint folder to resume from, or true for the latest in output_dir")
    overwrite_output_dir: bool = option(False, "start anew in an output_dir that holds another run (its "
                                        "checkpoints deleted first); false: such a folder is refused")
    # Sampling.
    sample_num_steps: int = option(50, "DDIM steps per image", ge=1)
    sample_eta: float = option(1.0, "DDIM's eta (the noise of each step; DDPO needs it > 0)", gt=0)
    sample_guidance_scale: float = option(5.0, "classifier-free guidance scale (1: unguided)", ge=0)
    sample_batch_size: int = option(1, "images per sampling batch", ge=1)
    sample_num_batches_per_epoch: int = option(2, "sampling batches per epoch", ge=1)
    negative_prompts: str = option("", "the negative prompt of classifier-free guidance")
    # Training.
    train_batch_size: int = option(1, "images per training micro-batch", ge=1)
    train_learning_rate: float = option(3e-4, "AdamW's learning rate", ge=0)
    train_adam_beta1: float = option(0.9, "AdamW's first-moment decay", ge=0, lt=1)
    train_adam_beta2: float = option(0.999, "AdamW's second-moment decay", ge=0, lt=1)
    train_adam_weight_decay: float = option(1e-4, "AdamW's decoupled weight decay", ge=0)
    train_adam_epsilon: float = option(1e-8, "AdamW's epsilon", ge=0)
    train_gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", ge=1)
    train_max_grad_norm: float = option(1.0, "clip the gradient to this norm (0: no clipping)", ge=0)
    train_num_inner_epochs: int = option(1, "passes over each epoch's samples", ge=1)
    train_cfg: bool = option(True, "train with classifier-free guidance, as the samples were drawn")
    train_adv_clip_max: float = option(5.0, "clip advantages to [-this, this]", gt=0)
    train_clip_range: float = option(1e-4, "the probability ratio's clip range", gt=0)
    train_timestep_fraction: float = option(1.0, "the fraction of each sample's timesteps trained on", gt=0, le=1)
    # Advantages.
    per_prompt_stat_tracking: bool = option(False, "normalise rewards per prompt (false: over the epoch)")
    per_prompt_stat_tracking_buffer_size: int = option(16, "rewards kept per prompt", ge=1)
    per_prompt_stat_tracking_min_count: int = option(16, "rewards a prompt needs before its own statistics are "
                                                     "used", ge=1)
    # Rewards.
    async_reward_computation: bool = option(False, "score images in threads while sampling goes on")
    max_workers: int = option(2, "threads of async_reward_computation", ge=1)
    # The trained weights.
    use_lora: bool = option(True, "train LoRA adapters on the UNet (false: the whole UNet)")
    lora_rank: int = option(4, "the LoRA rank", ge=1)
    # Logging.
    report_to: tuple[str, ...] = option((), "also report to: [tensorboard] or none")
    disable_tqdm: bool = option(False, "no progress bar")

    def __post_init__(self):
        if isinstance(self.report_to, str):
            self.report_to = () if self.report_to in ("none", "") else (self.report_to,)
        if isinstance(self.report_to, list):  # as YAML gives it
            self.report_to = tuple(self.report_to)
        check_fields(self)
        if self.num_train_timesteps < 1:
            raise ConfigError(f"train_timestep_fraction ({self.train_timestep_fraction}) of sample_num_steps "
                              f"({self.sample_num_steps}) leaves no timestep to train on")
        if self.sample_batch_size % self.train_batch_size:
            raise ConfigError(f"sample_batch_size ({self.sample_batch_size}) must be a multiple of train_batch_size "
                              f"({self.train_batch_size})")
        if self.samples_per_epoch % self.samples_per_optimizer_step:
            raise ConfigError(
                f"an epoch's {self.samples_per_epoch} samples (sample_batch_size x sample_num_batches_per_epoch) must "
                f"be a multiple of the {self.samples_per_optimizer_step} of an optimizer step (train_batch_size x "
                "train_gradient_accumulation_steps)")
        if not self.train_cfg and self.sample_guidance_scale > 1:
            raise ConfigError(f"train_cfg=False with sample_guidance_scale={self.sample_guidance_scale}: samples drawn "
                              "with guidance would be trained without it; set train_cfg=True or the scale to 1")

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
