"""DDPO's math: the log-probability of a DDIM step, and the clipped DDPO loss.

DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning",
arXiv:2305.13301) treats each denoising step as a policy action. A DDIM step (Song et al. 2021,
arXiv:2010.02502) with ``eta > 0`` samples the previous latent from a Gaussian:

    a_t, a_p   = alphas_cumprod[t], alphas_cumprod[t_prev]          t_prev = t - T_train / steps
    x0_hat     = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)           (epsilon prediction; also
                                                                     "sample" and "v_prediction")
    sigma_t    = eta * sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    mean       = sqrt(a_p) x0_hat + sqrt(1 - a_p - sigma_t^2) eps_hat
    x_{t-1}    = mean + sigma_t z,   z ~ N(0, I)                     (or a given x_{t-1})
    log_prob   = mean over the latent's elements of log N(x_{t-1}; mean, sigma_t^2)

As TRL 0.7.10 does, ``t_prev`` is clamped to ``[0, T_train - 1]`` (so the last step uses
``alphas_cumprod[0]``), and the log-density is averaged, not summed, over the latent's elements.

The loss, per sampled step, with ``ratio = exp(log_prob - old_log_prob)`` and advantages clipped
to ``[-adv_clip_max, adv_clip_max]``:

    loss = mean(max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range)))

Both are a few elementwise ops over latents: plain torch on every device.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DDIMScheduler


def _per_sample(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A scalar or ``[B]`` tensor, broadcast against ``[B, ...]``."""
    return x.reshape(x.shape + (1,) * (len(shape) - x.dim()))


def _alpha(scheduler: DDIMScheduler, timestep: torch.Tensor) -> torch.Tensor:
    return scheduler.alphas_cumprod.gather(0, timestep.cpu().long())


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step of a diffusers ``DDIMScheduler``: ``(prev_sample, log_prob [B])``.

    ``model_output`` and ``sample`` are ``[B, ...]`` latents, ``timestep`` an int or ``[B]``
    tensor. Given ``prev_sample``, returns it with its log-probability (no sampling); else samples
    it with ``generator``. ``eta`` must be > 0 for the log-probability to exist.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) before stepping")
    if prev_sample is not None and generator is not None:
        raise ValueError("give prev_sample or generator, not both")
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for a DDIM step to have a log-probability, got {eta}")
    config = scheduler.config
    timestep = torch.as_tensor(timestep, device=sample.device).long()
    prev_timestep = (timestep - config.num_train_timesteps // scheduler.num_inference_steps).clamp(
        0, config.num_train_timesteps - 1
    )
    a_t = _per_sample(_alpha(scheduler, timestep), sample.shape).to(sample.device, torch.float32)
    a_p = _per_sample(_alpha(scheduler, prev_timestep), sample.shape).to(sample.device, torch.float32)
    x, out = sample.float(), model_output.float()

    # 1. The predicted clean sample and noise, per the scheduler's parameterisation.
    if config.prediction_type == "epsilon":
        x0, eps = (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
    elif config.prediction_type == "sample":
        x0 = out
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    elif config.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
    else:
        raise ValueError(f"prediction_type {config.prediction_type!r} is not epsilon, sample or v_prediction")
    if config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    if use_clipped_model_output:
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()

    # 2. The step's Gaussian: mean and standard deviation.
    sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    if (sigma == 0).any():
        raise ValueError(
            f"the DDIM step at timestep {timestep.tolist()} has zero variance (its previous timestep "
            "clamps onto itself), so it has no log-probability; use a scheduler with steps_offset >= 1"
        )
    mean = a_p.sqrt() * x0 + (1 - a_p - sigma**2).sqrt() * eps

    # 3. Sample (or take) x_{t-1}, and its log-density averaged over the latent's elements.
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = mean + sigma * noise
    log_prob = -((prev_sample.detach().float() - mean) ** 2) / (2 * sigma**2) - sigma.log() - 0.5 * math.log(2 * math.pi)
    return prev_sample.to(sample.dtype), log_prob.mean(dim=tuple(range(1, log_prob.dim())))


def ddpo_loss(
    advantages: torch.Tensor, ratio: torch.Tensor, clip_range: float, adv_clip_max: float
) -> torch.Tensor:
    """The clipped DDPO loss (a scalar) of one sampled timestep across a batch.

    ``advantages [B]`` are clipped to ``[-adv_clip_max, adv_clip_max]``; ``ratio [B]`` is
    ``exp(log_prob - old_log_prob)``.
    """
    if advantages.shape != ratio.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} must match ratio {tuple(ratio.shape)}")
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()
