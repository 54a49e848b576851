"""PPO's generation: the policy's (or the reference's) responses to queries, left-padded batches
through ``model.generate`` (an encoder-decoder model's queries to its encoder); under ZeRO-3 the policy is gathered once for the whole rollout.

``whole_model`` lifts DeepSpeed's per-module parameter hooks while the gathered model generates:
DeepSpeed has no public switch for it (checked against deepspeed 0.19.8), and with the hooks in place
every generated token would gather and release every layer again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from fastalign.models.modes import eval_mode


def generate_responses(model: torch.nn.Module, query_tensor: torch.Tensor | list[torch.Tensor], *,
                       device: torch.device, pad_token_id: int, length_sampler: Callable[[], int] | None,
                       batch_size: int, return_prompt: bool, remove_padding: bool,
                       context: contextlib.AbstractContextManager, kwargs: dict,
                       encoder_decoder: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """``model``'s responses to ``query_tensor`` (one 1-D tensor: returns ``[1, L]``; or a list of
    them: returns a list), generated ``batch_size`` at a time with left padding under ``context``,
    each cut after its first end-of-sequence token with ``remove_padding``; ``length_sampler()``
    draws ``max_new_tokens`` per generation batch. An ``encoder_decoder`` model's queries go to its
    encoder; its responses are the decoder's tokens after the start token, never with the prompt."""
    single = torch.is_tensor(query_tensor) and query_tensor.dim() == 1
    queries = [query_tensor] if single else list(query_tensor)
    outputs = []
    with eval_mode(model), context:
        for start in range(0, len(queries), batch_size):
            chunk = [q.to(device).long() for q in queries[start:start + batch_size]]
            if length_sampler is not None:
                kwargs["max_new_tokens"] = length_sampler()
            width = max(len(q) for q in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long, device=device)
            attention = torch.zeros_like(ids)
            for k, q in enumerate(chunk):  # left padding
                ids[k, width - len(q):] = q
                attention[k, width - len(q):] = 1
            generated = model.generate(input_ids=ids, attention_mask=attention, **kwargs)
            for k, q in enumerate(chunk):
                new = generated[k, 1 if encoder_decoder else width:]
                if remove_padding and kwargs.get("eos_token_id") is not None:
                    ends = (new == kwargs["eos_token_id"]).nonzero()
                    if len(ends):
                        new = new[:int(ends[0]) + 1]  # keep the end-of-sequence token
                outputs.append(torch.cat([q, new]) if return_prompt and not encoder_decoder else new)
    return outputs[0].unsqueeze(0) if single else outputs


@contextlib.contextmanager
def whole_model(ds_engine: object) -> Iterator[None]:
    """ZeRO-3: every parameter gathered once, the per-module fetch/release hooks lifted meanwhile."""
    import deepspeed

    offload = ds_engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(ds_engine.module.parameters()), modifier_rank=None):
        offload._remove_module_hooks()
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()
