"""A DDPO run built from the command's run keys: a pipeline, a named reward function and a named
prompt function (no data set: the prompt function draws the prompts)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastalign.tasks.registry import image_reward, prompt_function

from ..launch import RunKey, defaults

if TYPE_CHECKING:
    from .config import DDPOConfig

DDPO_KEYS = (
    RunKey("pipeline_name_or_path", str, "a Stable Diffusion pipeline (hub name or local path), or "
           "fastalign/tiny-sd (built in, random weights)", required=True),
    RunKey("reward_function", str, "'jpeg_compressibility', 'jpeg_incompressibility' or 'package.module:function' "
           "taking (images, prompts, metadata), returning (rewards, metadata)", required=True),
    RunKey("prompt_function", str, "'animals' (simple animal names) or 'package.module:function' returning "
           "(prompt, metadata)", required=True),
)


def launch_ddpo(trainer_class: type, config: DDPOConfig, run: dict) -> dict:
    """DDPO of the run's pipeline."""
    run = defaults(DDPO_KEYS, run)
    reward_fn, prompt_fn = image_reward(run["reward_function"]), prompt_function(run["prompt_function"])
    return trainer_class(config, reward_fn, prompt_fn, run["pipeline_name_or_path"]).train()
