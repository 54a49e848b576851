"""A PPO batch laid out flat over its response tokens (``Rollout``), and the exact per-token KL
between the policy and the reference over the whole vocabulary (``full_kl``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.data import Sequence
from fastalign.kernels.kl import kl_penalty
from fastalign.models import gathered, lm_head


@dataclass
class Rollout:
    """A PPO batch laid out flat over its response tokens, sample after sample: sample ``i`` owns
    positions ``cu[i]:cu[i+1]``. Per-token tensors are fp32 ``[M]``."""

    queries: list
    responses: list
    cu: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kls: torch.Tensor | None = None  # filled in the forward pass for kl_penalty="full"
    scores: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    non_score_rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def units(self) -> list[list[Sequence]]:
        """Each sample as a packing unit: query+response, the loss at the response tokens."""
        return [[Sequence(torch.cat([q, a]).tolist(), [False] * len(q) + [True] * len(a))]
                for q, a in zip(self.queries, self.responses)]

    def positions(self, samples) -> torch.Tensor:
        """Flat positions of ``samples``' response tokens, in that order."""
        cu = self.cu.tolist()
        return torch.cat([torch.arange(cu[i], cu[i + 1]) for i in samples]).to(self.cu.device)

    def padded(self, flat: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``flat [M]`` as ``[B, longest response]`` (zeros after each response), and the
        ``(rows, cols)`` index that reads the flat layout back out of it."""
        lengths = (self.cu[1:] - self.cu[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=flat.device), lengths.to(flat.device))
        cols = torch.arange(flat.numel(), device=flat.device) - self.cu[:-1].long().to(flat.device)[rows]
        out = flat.new_zeros(len(lengths), int(lengths.max()))
        out[rows, cols] = flat
        return out, (rows, cols)


def full_kl(policy, hidden, ref, ref_hidden, chunk: int = 256) -> torch.Tensor:
    """Exact KL(policy || reference) over the vocabulary at each row of ``hidden`` (fp32 ``[M]``),
    the logits of ``chunk`` tokens at a time."""
    w, b = lm_head(policy)
    rw, rb = lm_head(ref)
    out = []
    with gathered(w, b), gathered(rw, rb):
        for s in range(0, hidden.shape[0], chunk):
            x = torch.nn.functional.linear(hidden[s:s + chunk], w, b)
            y = torch.nn.functional.linear(ref_hidden[s:s + chunk], rw, rb)
            out.append(kl_penalty(x, y, "full"))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
