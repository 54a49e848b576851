"""The checks on what a caller hands ``PPOTrainer.step``: one clear error naming the sample."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_step_inputs(queries: list[torch.Tensor], responses: list[torch.Tensor], scores: Sequence[float] | torch.Tensor,
                      response_masks: list[torch.Tensor] | None, *, batch_size: int, vocab: int,
                      device: torch.device) -> tuple[list, list, torch.Tensor, list | None]:
    """``(queries, responses, scores, response_masks)`` of one PPO step, checked: ``batch_size``
    samples, 1-D token-id tensors inside ``[0, vocab)``, masks shaped like their responses, finite
    scores (returned as an fp32 tensor on ``device``); a bad one is named with its index."""
    bs = batch_size
    named = {"queries": queries, "responses": responses, "scores": scores}
    if response_masks is not None:
        named["response_masks"] = response_masks
    for name, value in named.items():
        if not isinstance(value, (list, tuple)) and not torch.is_tensor(value):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
        if len(value) != bs:
            raise ValueError(f"batch_size is {bs} but {name} holds {len(value)} samples")
    for name in ("queries", "responses"):
        for i, t in enumerate(named[name]):
            if not torch.is_tensor(t) or t.dim() != 1 or t.dtype.is_floating_point:
                raise TypeError(f"{name}[{i}] must be a 1-D tensor of token ids")
            if t.numel() == 0:
                raise ValueError(f"{name}[{i}] is empty: PPO needs at least one token in every query and response")
            bad = ((t < 0) | (t >= vocab)).nonzero()
            if len(bad):
                raise ValueError(f"{name}[{i}], position {int(bad[0])}: token id {int(t[bad[0]])} is outside the "
                                 f"vocabulary [0, {vocab})")
    if response_masks is not None:
        for i, (rm, r) in enumerate(zip(response_masks, responses)):
            if rm.shape != r.shape:
                raise ValueError(f"response_masks[{i}] has shape {tuple(rm.shape)}, response {i} has {tuple(r.shape)}")
    scores = torch.stack([torch.as_tensor(s, dtype=torch.float32).reshape(()) for s in scores]).to(device)
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        raise ValueError(f"scores[{int(bad[0])}] is {float(scores[bad[0]])}: every score must be finite")
    return list(queries), list(responses), scores, response_masks
