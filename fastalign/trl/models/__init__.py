"""``trl.models``: value-head models, the reference model, the chat format, the DDPO pipeline."""

from .modeling_value_head import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
    create_reference_model,
    setup_chat_format,
)


def __getattr__(name):  # the diffusion names need diffusers only when used
    if name in ("DDPOPipelineOutput", "DDPOSchedulerOutput", "DDPOStableDiffusionPipeline",
                "DefaultDDPOStableDiffusionPipeline"):
        from . import modeling_sd_base

        return getattr(modeling_sd_base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AutoModelForCausalLMWithValueHead", "AutoModelForSeq2SeqLMWithValueHead", "DDPOPipelineOutput",
           "DDPOSchedulerOutput", "DDPOStableDiffusionPipeline", "DefaultDDPOStableDiffusionPipeline",
           "PreTrainedModelWrapper", "create_reference_model", "setup_chat_format"]
