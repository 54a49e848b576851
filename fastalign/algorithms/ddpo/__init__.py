"""DDPO: reinforcement learning for a Stable Diffusion pipeline's UNet (Black et al. 2023,
"Training Diffusion Models with Reinforcement Learning", arXiv:2305.13301).

Each epoch has two phases.

1. Sampling. ``sample_num_batches_per_epoch`` batches of ``sample_batch_size`` prompts from
   ``prompt_function() -> (prompt, metadata)`` are denoised with DDIM over ``sample_num_steps``
   steps at ``sample_eta`` (> 0, so each step is a Gaussian policy action) and classifier-free
   guidance ``sample_guidance_scale``, recording every step's latent before and after and its
   log-probability (:func:`fastalign.kernels.ddpo.ddim_step_with_logprob`). The VAE decodes the
   final latents to images in ``[0, 1]``, and ``reward_function(images, prompts, metadata) ->
   (rewards, reward_metadata)`` scores them (in a thread pool with ``async_reward_computation``).
   Advantages are the rewards normalised over the epoch's samples, or per prompt with
   ``per_prompt_stat_tracking`` (:class:`fastalign.kernels.rl.PerPromptStatTracker`).
2. Training. ``train_num_inner_epochs`` passes over the samples, shuffled, each sample's
   timesteps in its own random order, of which the first ``train_timestep_fraction`` are trained.
   Per batch of ``train_batch_size`` samples and per trained timestep, the UNet recomputes the
   step's log-probability of the recorded next latent and the clipped loss
   (:func:`fastalign.kernels.ddpo.ddpo_loss`) on ``ratio = exp(new - old)``. The optimizer steps
   once every ``train_gradient_accumulation_steps`` batches, all their timesteps accumulated (the
   loss is their mean). Each optimizer step logs ``loss``, ``approx_kl`` (half the mean squared
   log-ratio), ``clipfrac``, ``grad_norm`` and ``lr``, the first of an epoch also its samples'
   ``reward_mean`` and ``reward_std``. The first optimizer step of an epoch trains the very
   policy that sampled: every ratio is exactly 1, so its ``approx_kl`` and ``clipfrac`` are 0,
   and with advantages normalised over the samples it trains on (one step per epoch) its
   ``loss`` is 0 too while its gradient is not (``grad_norm``). These are the true values, not
   a logging fault; they move from the second optimizer step of an epoch on (more
   ``sample_num_batches_per_epoch`` than ``train_gradient_accumulation_steps``, or
   ``train_num_inner_epochs`` > 1).

The text encoder and VAE are frozen; the UNet is trained, or LoRA adapters on its attention
projections (``use_lora``, rank 4). With ``mixed_precision`` ``"fp16"``/``"bf16"`` the frozen
weights are cast to that type and the forwards run under autocast; trained weights stay fp32.

Names, defaults and the math follow TRL 0.7.10's ``DDPOConfig``/``DDPOTrainer``. Differences:

- the pipeline is any diffusers ``StableDiffusionPipeline`` (or its name or path), its scheduler
  replaced by a ``DDIMScheduler`` with the same configuration; LoRA goes through diffusers' PEFT
  integration;
- sampling draws its noise from the trainer's own seeded generator, saved in checkpoints, so a
  resumed run samples exactly what an uninterrupted one would;
- sampling and training always compute the same policy: guided (classifier-free guidance at
  ``sample_guidance_scale``) when ``train_cfg`` and the scale is not 1, else unguided;
  ``train_cfg=False`` with a scale above 1 is refused (samples drawn with guidance would be
  trained without it, every ratio off from the start);
- ``mixed_precision="fp16"`` (the default) falls back to fp32 on a CPU, with a warning;
- one process (no multi-device data parallelism yet).

Checkpoints (``output_dir/checkpoint-STEP``, every ``save_freq`` epochs, ``num_checkpoint_limit``
kept) hold the trained weights (the UNet, or only its adapters), the optimizer, the epoch, the
per-prompt statistics and every random state; ``resume_from`` (a checkpoint folder, or ``True``
for the latest in ``output_dir``) continues from one. The final save writes the whole pipeline
in diffusers format, or only the LoRA weights (``pytorch_lora_weights.safetensors``, for
``pipeline.load_lora_weights``).
"""

from fastalign.tasks.registry import image_reward as reward_function
from fastalign.tasks.registry import prompt_function

from .config import DDPOConfig
from .pipeline import TINY_PIPELINE, image_grid
from .trainer import DDPOTrainer

__all__ = ["DDPOConfig", "DDPOTrainer", "TINY_PIPELINE", "image_grid", "prompt_function", "reward_function"]
