"""Where completions come from: the ``Generator`` interface, and the policy's own ``generate``.

A generator takes prompts as 1-D token tensors and returns ``n`` completions per prompt,
prompt-major (``[p0c0, p0c1, ..., p1c0, ...]``), each a 1-D tensor of new tokens cut after its
first end-of-sequence token. ``ModelGenerator`` runs the trained model's ``generate`` the way PPO
does (left-padded batches, ``fastalign.algorithms.ppo.generation``), under ZeRO-3 with the whole
policy gathered once per call; a faster engine (vLLM, SGLang, a server) plugs in as another
object with the same ``generate`` method, given to the trainer as ``generator=``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from ..ppo.generation import generate_responses, whole_model


@runtime_checkable
class Generator(Protocol):
    def generate(self, prompt_ids: list[torch.Tensor], n: int, **sampling) -> list[torch.Tensor]:
        """``n`` completions of each prompt, prompt-major; ``sampling``: ``max_new_tokens``,
        ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` and any other
        option the engine takes."""
        ...


class ModelGenerator:
    """The trained model's own ``generate``: all the process's prompts in one left-padded batch
    (``batch_size`` at a time when set), sampling on, each completion cut after its first
    end-of-sequence token. ``context()`` is entered around each call (``zero3_context`` under
    ZeRO-3); ``synced`` passes ``synced_gpus`` (ZeRO-3 without the whole-model gather)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, pad_token_id: int, eos_token_id: int | None,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 batch_size: int | None = None, synced: bool = False):
        self.model, self.device, self.context = model, device, context
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.batch_size, self.synced = batch_size, synced

    def generate(self, prompt_ids: list[torch.Tensor], n: int, **sampling) -> list[torch.Tensor]:
        repeated = [p for p in prompt_ids for _ in range(n)]
        if not repeated:
            return []
        kwargs = {"do_sample": True, "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id, **sampling}
        if self.synced:
            kwargs["synced_gpus"] = True
        with torch.no_grad():
            return generate_responses(self.model, repeated, device=self.device, pad_token_id=self.pad_token_id,
                                      length_sampler=None, batch_size=self.batch_size or len(repeated),
                                      return_prompt=False, remove_padding=True, context=self.context(), kwargs=kwargs)


def zero3_context(engine) -> Callable[[], contextlib.AbstractContextManager]:
    """What a ``ModelGenerator`` enters under ``engine``: the whole ZeRO-3 policy gathered once
    (``whole_model``), nothing otherwise."""
    if engine.zero_stage != 3:
        return contextlib.nullcontext
    return lambda: whole_model(engine.deepspeed)


def sampling_options(config) -> dict:
    """A ``GroupConfig``'s sampling options as ``generate`` keywords (``generation_kwargs`` last)."""
    options = {"max_new_tokens": config.max_completion_length, "temperature": config.temperature,
               "top_p": config.top_p, "top_k": config.top_k, "repetition_penalty": config.repetition_penalty}
    if config.min_p is not None:
        options["min_p"] = config.min_p
    return {**options, **(config.generation_kwargs or {})}
