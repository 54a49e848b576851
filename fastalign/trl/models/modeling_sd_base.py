"""``trl.models``' Stable Diffusion pipeline for DDPO: ``DefaultDDPOStableDiffusionPipeline`` holds
a diffusers ``StableDiffusionPipeline`` (DDIM scheduler) and whether LoRA adapters are trained;
``DDPOTrainer`` samples and trains through fastalign's DDPO. ``"fastalign/tiny-sd"`` is the
built-in tiny pipeline (random weights, nothing downloaded)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastalign.algorithms.ddpo.pipeline import load_pipeline


@dataclass
class DDPOPipelineOutput:
    images: object
    latents: list = field(default_factory=list)
    log_probs: list = field(default_factory=list)


@dataclass
class DDPOSchedulerOutput:
    latents: torch.Tensor
    log_probs: torch.Tensor


class DDPOStableDiffusionPipeline:
    """TRL's pipeline interface: ``unet``, ``vae``, ``tokenizer``, ``scheduler``, ``text_encoder``,
    ``use_lora``, ``__call__``, ``save_pretrained``."""

    def __init__(self, sd_pipeline, use_lora: bool = True):
        self.sd_pipeline = load_pipeline(sd_pipeline)
        self.use_lora = use_lora

    unet = property(lambda self: self.sd_pipeline.unet)
    vae = property(lambda self: self.sd_pipeline.vae)
    tokenizer = property(lambda self: self.sd_pipeline.tokenizer)
    scheduler = property(lambda self: self.sd_pipeline.scheduler)
    text_encoder = property(lambda self: self.sd_pipeline.text_encoder)
    autocast = property(lambda self: torch.autocast("cuda") if torch.cuda.is_available() else torch.autocast("cpu"))

    def __call__(self, *args, **kwargs) -> DDPOPipelineOutput:
        """Images for the prompts (PIL by default), from the diffusers pipeline."""
        out = self.sd_pipeline(*args, **kwargs)
        return DDPOPipelineOutput(images=out.images)

    def set_progress_bar_config(self, *args, **kwargs) -> None:
        self.sd_pipeline.set_progress_bar_config(*args, **kwargs)

    def save_pretrained(self, output_dir: str) -> None:
        self.sd_pipeline.save_pretrained(output_dir)

    def get_trainable_layers(self):
        return [p for p in self.unet.parameters() if p.requires_grad]


class DefaultDDPOStableDiffusionPipeline(DDPOStableDiffusionPipeline):
    """``DefaultDDPOStableDiffusionPipeline(pretrained_model_name, pretrained_model_revision="main",
    use_lora=True)``: a pipeline by name or path (``"fastalign/tiny-sd"`` built in) or object."""

    def __init__(self, pretrained_model_name, *, pretrained_model_revision: str = "main", use_lora: bool = True):
        if pretrained_model_revision not in ("main", None):
            raise ValueError("pretrained_model_revision: only the default revision ('main') is supported")
        super().__init__(pretrained_model_name, use_lora)


__all__ = ["DDPOPipelineOutput", "DDPOSchedulerOutput", "DDPOStableDiffusionPipeline",
           "DefaultDDPOStableDiffusionPipeline"]
