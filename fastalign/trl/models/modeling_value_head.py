"""``trl.models``' value-head models: ``AutoModelForCausalLMWithValueHead`` on fastalign's
``CausalLMWithValueHead`` and ``AutoModelForSeq2SeqLMWithValueHead`` on its
``Seq2SeqLMWithValueHead`` (an encoder-decoder LM such as T5, the value head on the decoder's
final hidden states; PPO runs it padded). Same head as TRL's: dropout then ``Linear(hidden, 1)``;
saved as the LM in Hugging Face format plus ``value_head.safetensors``. Also
``create_reference_model`` and ``setup_chat_format``."""

from __future__ import annotations

import copy
import tempfile

import torch

from fastalign.algorithms.ppo import create_reference_model as _native_reference
from fastalign.models import CausalLMWithValueHead, Seq2SeqLMWithValueHead, is_encoder_decoder
from fastalign.models.value_head import HEAD_FILE
from fastalign.trl.trainer.loading import init_kwargs

HEAD_KWARGS = ("summary_dropout_prob", "v_head_init_strategy", "v_head_initializer_range")


class _TRLValueHead:
    """What TRL's value-head models add: ``from_pretrained(name or model, peft_config=...,
    **from_pretrained_kwargs)`` (LoRA applied when ``peft_config`` is given), ``is_peft_model``,
    ``current_device``, ``push_to_hub``. ``encoder_decoder``: the kind of LM the class takes."""

    encoder_decoder = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        peft_config = kwargs.pop("peft_config", None)
        kwargs.pop("reward_adapter", None)
        kwargs.pop("is_trainable", None)
        head = {k: kwargs.pop(k) for k in HEAD_KWARGS if k in kwargs}
        model = super().from_pretrained(pretrained_model_name_or_path, **head, **init_kwargs(kwargs))
        if is_encoder_decoder(model.pretrained_model) and not cls.encoder_decoder:  # the other way: __init__ says
            other = "AutoModelForSeq2SeqLMWithValueHead"
            raise ValueError(f"{type(model.pretrained_model).__name__} is an encoder-decoder model: use {other}")
        model.__class__ = cls
        if peft_config is not None:
            from peft import get_peft_model

            model.pretrained_model = get_peft_model(model.pretrained_model, peft_config)
        return model

    @property
    def is_peft_model(self) -> bool:
        return self.is_peft()

    @property
    def current_device(self) -> torch.device:
        return next(self.parameters()).device

    def push_to_hub(self, repo_id: str, *args, **kwargs) -> str:
        """Upload the model (one clear error when the Hub cannot be reached)."""
        from fastalign.trl.trainer.base import push_folder

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return push_folder(folder, repo_id, kwargs.get("token"), kwargs.get("private"))


class AutoModelForCausalLMWithValueHead(_TRLValueHead, CausalLMWithValueHead):
    """A causal LM with a scalar value head (TRL's class): ``pretrained_model``, ``v_head``,
    ``forward(input_ids, attention_mask) -> (logits, None, values)``, ``generate``,
    ``save_pretrained``."""

    transformers_parent_class = "AutoModelForCausalLM"
    supports_rm_adapter = False


class AutoModelForSeq2SeqLMWithValueHead(_TRLValueHead, Seq2SeqLMWithValueHead):
    """An encoder-decoder LM with a scalar value head on its decoder (TRL's class):
    ``forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) -> (logits,
    None, values)``, ``generate``, ``save_pretrained``; ``is_encoder_decoder`` is there, as
    TRL's ``PPOTrainer`` looks for it."""

    transformers_parent_class = "AutoModelForSeq2SeqLM"
    supports_rm_adapter = False
    encoder_decoder = True
    is_encoder_decoder = True
    causal_class = "AutoModelForCausalLMWithValueHead"


PreTrainedModelWrapper = CausalLMWithValueHead


def create_reference_model(model, num_shared_layers: int | None = None, pattern: str | None = None):
    """A frozen reference of ``model`` (a value-head model or a causal LM), in eval mode; with
    ``num_shared_layers`` the bottom layers are the policy's own (frozen in both)."""
    if pattern is not None:
        raise ValueError("create_reference_model: pattern is not supported; layers are found by their names")
    if not isinstance(model, CausalLMWithValueHead):
        return _native_reference(model, num_shared_layers)
    ref = copy.copy(model)
    torch.nn.Module.__init__(ref)
    ref.pretrained_model = _native_reference(model.pretrained_model, num_shared_layers)
    ref.v_head = copy.deepcopy(model.v_head).requires_grad_(False)
    return ref.eval()


def setup_chat_format(model, tokenizer, format: str = "chatml", resize_to_multiple_of: int | None = None):
    """ChatML special tokens and chat template on ``tokenizer``, the embeddings resized to match."""
    if format != "chatml":
        raise ValueError(f"setup_chat_format: only 'chatml' is available, got {format!r}")
    start, end = "<|im_start|>", "<|im_end|>"
    tokenizer.add_special_tokens({"additional_special_tokens": [start, end]})
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token = end, end, start
    tokenizer.chat_template = ("{% for message in messages %}{{'" + start + "' + message['role'] + '\n' + "
                               "message['content'] + '" + end + "' + '\n'}}{% endfor %}"
                               "{% if add_generation_prompt %}{{ '" + start + "assistant\n' }}{% endif %}")
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=resize_to_multiple_of)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
            config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


__all__ = ["AutoModelForCausalLMWithValueHead", "AutoModelForSeq2SeqLMWithValueHead", "HEAD_FILE",
           "PreTrainedModelWrapper", "create_reference_model", "setup_chat_format"]
