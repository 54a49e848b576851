"""``fastalign.trl``: TRL 0.7.10's import paths over fastalign's native trainers.

A TRL 0.7.10 script ports by changing ``trl`` to ``fastalign.trl`` in its imports::

    from fastalign.trl import DPOTrainer, SFTTrainer, PPOConfig, PPOTrainer, AutoModelForCausalLMWithValueHead
    from fastalign.trl.core import LengthSampler, respond_to_batch

The layer maps TRL's signatures, configs (``transformers.TrainingArguments`` included), collators,
results (``TrainOutput``, ``state.log_history``) and metric names onto ``fastalign.algorithms``;
nothing in fastalign imports it. Encoder-decoder models (T5, BART) run padded in ``DPOTrainer``
(``is_encoder_decoder``), ``SFTTrainer`` and ``PPOTrainer`` (``AutoModelForSeq2SeqLMWithValueHead``);
not in ``IterativeSFTTrainer``. Importing it lets ``transformers.TrainingArguments`` take the
TRL-era names that later transformers removed (``evaluation_strategy``, ...; see
``fastalign.trl.args``).
"""

from .args import accept_legacy_names

accept_legacy_names()

from .core import set_seed  # noqa: E402
from .import_utils import (  # noqa: E402
    is_bitsandbytes_available,
    is_diffusers_available,
    is_npu_available,
    is_peft_available,
    is_wandb_available,
    is_xpu_available,
)
from .models import (  # noqa: E402
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
    create_reference_model,
    setup_chat_format,
)
from .trainer import (  # noqa: E402
    DataCollatorForCompletionOnlyLM,
    DPOTrainer,
    IterativeSFTTrainer,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTTrainer,
)

__version__ = "0.7.10"

# TRL 0.7.10 names this layer does not provide, and why.
UNSUPPORTED = {
    "TextEnvironment": "text environments (tool use) are not part of fastalign",
    "TextHistory": "text environments (tool use) are not part of fastalign",
    "BestOfNSampler": "sample with model.generate and score the answers yourself",
    "ConstantLengthDataset": "fastalign packs rows itself, without cutting documents into chunks",
}
DIFFUSION = ("DDPOConfig", "DDPOTrainer", "DDPOPipelineOutput", "DDPOSchedulerOutput", "DDPOStableDiffusionPipeline",
             "DefaultDDPOStableDiffusionPipeline")


def unsupported(module: str, name: str):
    """The ``AttributeError`` a missing name gives, or an ``ImportError`` saying why a TRL name is
    not provided."""
    if name in UNSUPPORTED:
        raise ImportError(f"fastalign.trl does not provide {name}: {UNSUPPORTED[name]}")
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


def __getattr__(name):  # the diffusion names need diffusers only when used
    if name in DIFFUSION:
        from . import models, trainer

        return getattr(trainer if name in ("DDPOConfig", "DDPOTrainer") else models, name)
    return unsupported(__name__, name)


__all__ = ["AutoModelForCausalLMWithValueHead", "AutoModelForSeq2SeqLMWithValueHead", "DDPOConfig",
           "DDPOPipelineOutput", "DDPOSchedulerOutput", "DDPOStableDiffusionPipeline", "DDPOTrainer",
           "DPOTrainer", "DataCollatorForCompletionOnlyLM", "DefaultDDPOStableDiffusionPipeline", "IterativeSFTTrainer",
           "PPOConfig", "PPOTrainer", "PreTrainedModelWrapper", "RewardConfig", "RewardTrainer", "SFTTrainer",
           "create_reference_model", "is_bitsandbytes_available", "is_diffusers_available", "is_npu_available",
           "is_peft_available", "is_wandb_available", "is_xpu_available", "set_seed", "setup_chat_format"]
