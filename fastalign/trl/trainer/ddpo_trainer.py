"""``trl.DDPOTrainer`` (0.7.10) on fastalign's ``DDPOTrainer``: ``DDPOTrainer(config,
reward_function, prompt_function, sd_pipeline, image_samples_hook)`` with TRL's pipeline object
(``DefaultDDPOStableDiffusionPipeline``: its ``use_lora`` decides LoRA), ``train()``, ``step()``,
``save_pretrained``, ``push_to_hub`` and ``sd_pipeline``.

``image_samples_hook(prompt_image_data, global_step, logger)`` gets a logger whose
``log_images(images_by_name, step)`` writes PNGs to ``OUTPUT_DIR/images/step_N/`` (TRL's go to the
tracker) and whose ``log(values, step)`` writes to ``OUTPUT_DIR/metrics.jsonl``; it works in
``step()`` calls before, during and after ``train()``. Logged: TRL's ``reward_mean``,
``reward_std``, ``loss``, ``approx_kl``, ``clipfrac``, ``epoch``, ``inner_epoch``, plus fastalign's
``grad_norm``, ``lr`` and timings.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastalign.algorithms.ddpo import DDPOTrainer as NativeDDPOTrainer
from fastalign.engine import distributed

from ..models.modeling_sd_base import DDPOStableDiffusionPipeline
from .accelerator import AcceleratorView
from .base import push_folder, write_model_card
from .ddpo_config import DDPOConfig

MAX_IMAGES = 16  # images written per log_images call


class ImageLogger:
    """What DDPO's ``image_samples_hook`` is handed: ``log_images`` and ``log``."""

    def __init__(self, trainer: DDPOTrainer):
        self.trainer = trainer

    def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        if not distributed.is_main():
            return
        from PIL import Image

        folder = Path(self.trainer.config.output_dir) / "images" / f"step_{step if step is not None else 0}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, (name, image) in enumerate(list(values.items())[:MAX_IMAGES]):
            image = image[0] if isinstance(image, (list, tuple)) else image
            if isinstance(image, torch.Tensor):
                array = image.detach().float().reshape(-1, *image.shape[-2:]).clamp(0, 1).cpu().numpy()
                image = Image.fromarray((array.transpose(1, 2, 0) * 255).round().astype(np.uint8).squeeze())
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_")[:60] or "image"
            image.save(folder / f"{k:02d}_{safe}.png")

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        logger = self.trainer.logger
        if logger is not None:
            logger.log(self.trainer.global_step if step is None else step, values)


class DDPOTrainer(NativeDDPOTrainer):
    def __init__(self, config: DDPOConfig | None = None, reward_function=None, prompt_function=None, sd_pipeline=None,
                 image_samples_hook=None):
        config = config if config is not None else DDPOConfig()
        if isinstance(sd_pipeline, DDPOStableDiffusionPipeline):
            config.use_lora = sd_pipeline.use_lora
            pipeline = sd_pipeline.sd_pipeline
        else:
            pipeline = sd_pipeline
        self._user_hook = image_samples_hook
        self.image_logger = ImageLogger(self)
        hook = self._hook if image_samples_hook is not None else None
        super().__init__(config, reward_function, prompt_function, pipeline, hook)
        self.sd_pipeline = sd_pipeline if isinstance(sd_pipeline, DDPOStableDiffusionPipeline) else (
            DDPOStableDiffusionPipeline(self.pipeline, config.use_lora))
        self.accelerator = AcceleratorView(self.device, self.image_logger.log)

    def _hook(self, prompt_image_data, global_step, logger):
        self._user_hook(prompt_image_data, global_step, self.image_logger)

    def save_pretrained(self, save_directory: str) -> None:
        """The trained pipeline (or its LoRA weights) and a model card in ``save_directory``."""
        self.save_model(save_directory)
        self.create_model_card(save_directory)

    _save_pretrained = save_pretrained

    def create_model_card(self, path: str, model_name: str | None = "TRL DDPO Model") -> None:
        write_model_card(path, model_name, "DDPOTrainer", None, None, ("ddpo", "diffusers", "text-to-image"))

    def push_to_hub(self, repo_id: str, commit_message: str = "End of training", token=None, **kwargs) -> str:
        """Upload the trained pipeline (or its LoRA weights); one clear error when the Hub cannot
        be reached (the weights are in ``output_dir`` after ``train()``)."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            try:
                return push_folder(folder, repo_id, token, kwargs.get("private"), commit_message)
            except Exception as err:
                if "cannot be reached" in str(err):
                    from .base import hub_error

                    raise hub_error("the trained pipeline", self.config.output_dir) from None
                raise
