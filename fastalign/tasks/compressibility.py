"""JPEG (in)compressibility: the DDPO paper's reward that needs no model.

An image's reward is the size of its JPEG encoding (quality 95) in kilobytes, negated for
compressibility: a policy rewarded by :func:`jpeg_compressibility` learns smooth, flat images, one
rewarded by :func:`jpeg_incompressibility` busy, high-frequency ones. Both follow the
``reward_function(images, prompts, metadata) -> (rewards, reward_metadata)`` signature that
:class:`fastalign.algorithms.DDPOTrainer` calls; :func:`animal_prompt` is a matching
``prompt_function() -> (prompt, metadata)`` drawing simple animal prompts.

Images may be a float tensor ``[B, 3, H, W]`` in ``[0, 1]`` (what the DDPO sampler decodes), a
uint8 array ``[B, H, W, 3]``, or a list of PIL images.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch

ANIMALS = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
    "lion", "tiger", "bear", "fox", "wolf", "frog", "duck", "pig", "llama", "camel", "bat", "whale",
)


def animal_prompt(animals=ANIMALS) -> tuple[str, dict]:
    """A ``prompt_function``: the name of a random animal (Python's ``random``), no metadata."""
    return random.choice(animals), {}


def to_uint8(images) -> list[np.ndarray]:
    """Images as ``[H, W, 3]`` uint8 arrays."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"image tensors must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(images)
    out = []
    for i, image in enumerate(images):
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3:
            raise ValueError(f"image {i}: expected a uint8 [H, W, C] array or a PIL image, got {array.dtype} "
                             f"of shape {array.shape}")
        out.append(array)
    return out


def jpeg_size_kb(images, quality: int = 95) -> list[float]:
    """The size of each image's JPEG encoding at ``quality``, in kilobytes (1000 bytes)."""
    from PIL import Image

    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


def jpeg_compressibility(images, prompts=None, metadata=None) -> tuple[torch.Tensor, dict]:
    """Reward: minus the JPEG size in kB (higher for images that compress better)."""
    return -torch.tensor(jpeg_size_kb(images), dtype=torch.float64), {}


def jpeg_incompressibility(images, prompts=None, metadata=None) -> tuple[torch.Tensor, dict]:
    """Reward: the JPEG size in kB (higher for images that compress worse)."""
    return torch.tensor(jpeg_size_kb(images), dtype=torch.float64), {}
