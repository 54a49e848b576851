"""PPO's rollout records: the batch's flat layout over its response tokens (``RolloutLayout``), what
the forwards give (``Forward``), the whole batch with its advantages (``Rollout``); and the exact
per-token KL between the policy and the reference over the vocabulary (``full_kl``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fastalign.data import Sequence
from fastalign.kernels.kl import kl_penalty
from fastalign.models import gathered, lm_head


@dataclass(frozen=True)
class RolloutLayout:
    """A PPO batch laid out flat over its response tokens, sample after sample: sample ``i`` owns
    positions ``cu[i]:cu[i+1]`` of every per-token tensor (``M`` tokens in all).

    ``queries``, ``responses``: the samples' 1-D token tensors; ``cu``: long ``[B + 1]``."""

    queries: list
    responses: list
    cu: torch.Tensor

    @classmethod
    def of(cls, queries: list[torch.Tensor], responses: list[torch.Tensor], device: torch.device) -> RolloutLayout:
        lengths = torch.tensor([len(r) for r in responses])
        cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
        cu[1:] = lengths.cumsum(0)
        return cls(list(queries), list(responses), cu.to(device))

    @property
    def num_tokens(self) -> int:
        return int(self.cu[-1])

    def units(self) -> list[list[Sequence]]:
        """Each sample as a packing unit: query+response, the loss at the response tokens."""
        return [[Sequence(torch.cat([q, a]).tolist(), [False] * len(q) + [True] * len(a))]
                for q, a in zip(self.queries, self.responses)]

    def positions(self, samples: list[int]) -> torch.Tensor:
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


@dataclass(frozen=True)
class Forward:
    """What the rollout forwards give, per response token (fp32 ``[M]``): ``mask`` (1: the
    policy's token), the policy's ``logprobs`` and ``values``, the reference's ``ref_logprobs``,
    ``full_kls`` (the exact KL over the vocabulary, only with ``kl_penalty="full"``, else None);
    and the samples' ``scores`` (fp32 ``[B]``, after scaling and clipping)."""

    layout: RolloutLayout
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    full_kls: torch.Tensor | None
    scores: torch.Tensor


@dataclass(frozen=True)
class Rollout:
    """A whole PPO batch, built once per step from the forwards and the advantages: the fields of
    ``Forward`` (``values`` as GAE returned them) and, per response token (fp32 ``[M]``), the
    shaped ``rewards``, their KL part ``non_score_rewards`` (``-kl_coef x kls``), the ``kls`` shaped
    from, the ``advantages`` and ``returns``."""

    layout: RolloutLayout
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kls: torch.Tensor
    rewards: torch.Tensor
    non_score_rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def queries(self) -> list:
        return self.layout.queries

    @property
    def responses(self) -> list:
        return self.layout.responses

    @property
    def cu(self) -> torch.Tensor:
        return self.layout.cu


class Stopwatch:
    """Seconds between marks, under the marks' names (``times``)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, key: str) -> None:
        now = time.perf_counter()
        self.times[key] = now - self._last
        self._last = now


def full_kl(policy: torch.nn.Module, hidden: torch.Tensor, ref: torch.nn.Module, ref_hidden: torch.Tensor,
            chunk: int = 256, head=lm_head) -> torch.Tensor:
    """Exact KL(policy || reference) over the vocabulary at each row of ``hidden`` (fp32 ``[M]``),
    the logits of ``chunk`` tokens at a time; ``head(model) -> (weight, bias)`` reads the lm_head."""
    w, b = head(policy)
    rw, rb = head(ref)
    out = []
    with gathered(w, b), gathered(rw, rb):
        for s in range(0, hidden.shape[0], chunk):
            x = torch.nn.functional.linear(hidden[s:s + chunk], w, b)
            y = torch.nn.functional.linear(ref_hidden[s:s + chunk], rw, rb)
            out.append(kl_penalty(x, y, "full"))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
