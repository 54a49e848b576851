"""PPO reward shaping: per-token rewards from a score per sequence and a KL penalty per token.

    kls         = the penalty per token (``kl_penalty`` of kind ``kl_penalty``)
    non_score   = -kl_coef * kls
    rewards     = non_score, plus the sequence's score at its LAST position whose mask is 1

As in TRL 0.7.10 the penalty is not zeroed where the mask is 0 (prompt or padding positions keep
theirs); GAE multiplies rewards by the mask before using them, so nothing of it leaks into the
advantages.

Two layouts, one computation: ``compute_rewards_packed`` takes one packed row (sequences end to end,
``cu_seqlens``); ``compute_rewards`` takes a padded ``[B, T]`` batch and reads it as a packed row of
``B`` sequences of ``T`` tokens each. Plain torch on every device (a few elementwise ops and one
scatter; ``full`` goes through the fused KL).
"""

from __future__ import annotations

import torch

from .kl import KINDS
from .kl import kl_penalty as token_penalty
from .segments import check_cu_seqlens


def _check_penalty_shapes(kind: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                          mask_name: str) -> None:
    token_shape = logprobs.shape[:-1] if kind == "full" else logprobs.shape
    if token_shape != mask.shape:
        what = "logprobs minus the vocabulary dim" if kind == "full" else "logprobs"
        raise ValueError(f"{mask_name} {tuple(mask.shape)} must match {what} {tuple(logprobs.shape)}")
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"ref_logprobs {tuple(ref_logprobs.shape)} must match logprobs {tuple(logprobs.shape)}"
        )


def _shape_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, flat_mask: torch.Tensor,
    cu_seqlens: torch.Tensor, kl_coef: float, kind: str, backend: str | None, no_position: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shaping of both layouts, over checked inputs: ``flat_mask [N]`` and ``cu_seqlens [S+1]``
    lay out ``S = len(scores)`` sequences; the outputs are shaped like the penalty. A sequence with
    no mask-1 position raises ``ValueError(no_position.format(those sequences))``."""
    # The last token with mask 1 of each sequence (-1 where a sequence has none).
    n, s = flat_mask.shape[0], scores.shape[0]
    pos = torch.arange(n, device=flat_mask.device)
    seq = torch.searchsorted(cu_seqlens[1:].to(device=pos.device, dtype=torch.long), pos, right=True)
    key = torch.where(flat_mask != 0, pos, -1)
    last = torch.full((s,), -1, dtype=torch.long, device=pos.device).scatter_reduce(0, seq, key, "amax")
    empty = (last < 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(no_position.format(empty))

    kls = token_penalty(logprobs, ref_logprobs, kind, backend=backend)
    non_score_rewards = -kl_coef * kls
    bonus = torch.zeros(n, dtype=non_score_rewards.dtype, device=non_score_rewards.device)
    bonus[last] = scores.to(bonus.dtype)
    return non_score_rewards + bonus.view(non_score_rewards.shape), non_score_rewards, kls


def compute_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, masks: torch.Tensor,
    kl_coef: float, kl_penalty: str = "kl", *, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO rewards over a padded batch: ``(rewards, non_score_rewards, kls)``, each ``[B, T]``.

    ``scores [B]`` (one per sequence), ``logprobs``/``ref_logprobs [B, T]`` (``[B, T, V]`` logits
    for ``kl_penalty="full"``), ``masks [B, T]`` 0/1 with any padding (left, right, holes).
    ``kls`` is the per-token penalty, ``non_score_rewards = -kl_coef * kls``, and ``rewards`` adds
    ``scores[b]`` at the last position of row ``b`` whose mask is 1. Masked positions keep their
    penalty, as in TRL 0.7.10. A row with no mask-1 position raises ValueError.
    """
    if kl_penalty not in KINDS:
        raise ValueError(f"unknown KL penalty kind {kl_penalty!r}; expected one of {KINDS}")
    if masks.dim() != 2:
        raise ValueError(f"masks must be [B, T], got shape {tuple(masks.shape)}")
    _check_penalty_shapes(kl_penalty, logprobs, ref_logprobs, masks, "masks")
    if scores.shape != masks.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)} must be one per row: [{masks.shape[0]}]")
    B, T = masks.shape
    rows = torch.arange(B + 1, device=masks.device) * T  # row b is the packed sequence b
    return _shape_rewards(
        scores, logprobs, ref_logprobs, masks.reshape(-1), rows, kl_coef, kl_penalty, backend,
        "masks row(s) {} have no position with mask 1: nowhere to put the score",
    )


def compute_rewards_packed(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor, kl_coef: float, kl_penalty: str = "kl", *, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO rewards over one packed row: ``(rewards, non_score_rewards, kls)``, each shaped like ``loss_mask``.

    ``loss_mask [N]`` or ``[1, N]`` (0/1 per token), ``cu_seqlens [S+1]`` (sequence ``s`` owns tokens
    ``cu_seqlens[s] <= t < cu_seqlens[s+1]``), ``scores [S]``, ``logprobs``/``ref_logprobs`` shaped
    like ``loss_mask`` (with a trailing ``V`` for ``kl_penalty="full"``). Same math as
    ``compute_rewards``: ``scores[s]`` lands on the last token of sequence ``s`` whose loss mask is 1;
    a sequence with none raises ValueError.
    """
    if kl_penalty not in KINDS:
        raise ValueError(f"unknown KL penalty kind {kl_penalty!r}; expected one of {KINDS}")
    if loss_mask.dim() == 2 and loss_mask.shape[0] == 1:
        flat_mask = loss_mask[0]
    elif loss_mask.dim() == 1:
        flat_mask = loss_mask
    else:
        raise ValueError(f"loss_mask must be one packed row [N] or [1, N], got shape {tuple(loss_mask.shape)}")
    _check_penalty_shapes(kl_penalty, logprobs, ref_logprobs, loss_mask, "loss_mask")
    if scores.dim() != 1:
        raise ValueError(f"scores must be [S], got shape {tuple(scores.shape)}")
    s = scores.shape[0]
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() != s + 1:
        raise ValueError(f"cu_seqlens must be [S+1] = [{s + 1}] for {s} scores, got shape {tuple(cu_seqlens.shape)}")
    check_cu_seqlens(cu_seqlens, flat_mask.shape[0])
    return _shape_rewards(
        scores, logprobs, ref_logprobs, flat_mask, cu_seqlens, kl_coef, kl_penalty, backend,
        "sequence(s) {} have no token with loss_mask 1: nowhere to put the score",
    )
