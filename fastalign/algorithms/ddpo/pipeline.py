"""DDPO's pipeline: loading a Stable Diffusion pipeline with a DDIM scheduler, placing its parts,
and an image grid of samples (reward and prompt functions by name: ``fastalign.tasks.registry``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastalign.errors import ConfigError

if TYPE_CHECKING:
    import PIL.Image
    from diffusers import StableDiffusionPipeline

TINY_PIPELINE = "fastalign/tiny-sd"  # the built-in pipeline: random weights, 64 x 64 images


def load_pipeline(pipeline: object) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` (built or loaded when a name or path) with a DDIM scheduler."""
    try:
        from diffusers import DDIMScheduler, StableDiffusionPipeline
    except ImportError as err:
        raise ImportError("DDPO needs diffusers: pip install 'fastalign[diffusion]'") from err
    if pipeline == TINY_PIPELINE:
        from fastalign.models.tiny import tiny_diffusion_pipeline

        pipeline = tiny_diffusion_pipeline(64)
    elif isinstance(pipeline, (str, Path)):
        pipeline = StableDiffusionPipeline.from_pretrained(str(pipeline), safety_checker=None)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipeline, part, None) is None:
            raise ConfigError(f"the pipeline has no {part}: DDPO needs a Stable Diffusion pipeline")
    if not isinstance(pipeline.scheduler, DDIMScheduler):
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module``, casting only when its dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if module.dtype != dtype:
        module.to(dtype)




def image_grid(images: torch.Tensor, rows: int | None = None, scale: int = 1) -> PIL.Image.Image:
    """Images ``[B, 3, H, W]`` in ``[0, 1]`` tiled into one PIL image, ``rows`` rows (default: as
    square as possible), each pixel repeated ``scale`` times."""
    from PIL import Image

    images = images.detach().float().clamp(0, 1).cpu()
    n, _, h, w = images.shape
    rows = rows or max(1, int(math.sqrt(n)))
    cols = -(-n // rows)
    grid = torch.ones(3, rows * (h + 2), cols * (w + 2))
    for i in range(n):
        r, col = divmod(i, cols)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = images[i]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image
