"""The training objectives over packed rows, weighted so an optimizer step is TRL's, however the
micro-batches are cut into rows; and the step's metrics, reduced over rows and processes.

A micro-batch ``B`` is ``per_device_train_batch_size`` completions of one process, packed into one
or more rows ``R``. TRL's loss of ``B`` (before its division by the gradient accumulation steps
``GA``, as in ``fastalign.kernels.grpo``) is rebuilt from its rows:

    grpo, dr_grpo   sum_R loss_R x |R| / |B|            (loss_R: the mean over R's completions)
    bnpo            sum_R (sum of R's token losses) / n_B          (n_B: B's mask tokens)
    dapo            sum_R (sum of R's token losses) / (N x GA / (P x steps_per_generation))
    rloo            sum_R loss_R x |R| / |B|            (loss_R: the mean over R's completions)

(N: the generation's mask tokens over all ``P`` processes.) Each is then divided by ``GA`` (not
dapo, whose normaliser already holds it) and by ``P``: the engine sums the processes' gradients,
TRL's data parallelism averages them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.engine import distributed
from fastalign.kernels import segment_sum
from fastalign.kernels.grpo import grpo_loss_packed, rloo_loss

CLIP_MEANS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


@dataclass(frozen=True)
class MicroBatch:
    """A micro-batch's shape: ``size`` completions, ``tokens`` mask tokens (this process's)."""

    size: int
    tokens: float


@dataclass(frozen=True)
class RowInputs:
    """One row's completions, flat over their tokens: the policy's ``logprobs`` (with gradients)
    and ``entropy``, the rollout's ``old``/``ref`` log-probs (None when not computed), ``mask``,
    ``cu`` (long ``[S+1]`` completion boundaries) and ``advantages [S]``."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    mask: torch.Tensor
    cu: torch.Tensor
    advantages: torch.Tensor

    @property
    def size(self) -> int:
        return self.cu.numel() - 1


def _masked(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    return float((x.detach() * mask).sum()), float(mask.sum())


def _extremes(metrics: dict) -> dict:
    return {name: (None, float(metrics[name])) for name in EXTREMES}


def grpo_row(row: RowInputs, micro: MicroBatch, config, num_items: float) -> tuple[torch.Tensor, dict]:
    """GRPO's loss of one row (its share of the micro-batch's TRL loss, before ``/ GA / P``) and
    its metric sums ``{name: (numerator, denominator)}`` (``EXTREMES``: ``(None, value)``)."""
    c = config
    kind, normaliser, share = c.loss_type, None, row.size / micro.size
    if c.loss_type == "bnpo":
        kind, normaliser, share = "dapo", max(micro.tokens, 1.0), 1.0
    elif c.loss_type == "dapo":
        world = distributed.world_size()
        normaliser = max(num_items, 1.0) / world * c.gradient_accumulation_steps / c.steps_per_generation
        share = float(c.gradient_accumulation_steps)  # its normaliser holds GA already; the caller divides by it
    loss, metrics = grpo_loss_packed(row.logprobs, row.old, row.ref, row.advantages, row.cu, row.mask,
                                     epsilon=c.epsilon, epsilon_high=c.epsilon_high, beta=c.beta, loss_type=kind,
                                     max_completion_length=c.max_completion_length, num_items_in_batch=normaliser)
    tokens = float(row.mask.sum())
    sums = {name: (float(metrics[name]) * tokens, tokens) for name in CLIP_MEANS}
    sums.update(_extremes(metrics))
    if c.beta != 0.0:
        sums["kl"] = (float(metrics["kl"]) * tokens, tokens)
    sums["entropy"] = _masked(row.entropy, row.mask)
    return loss * share, sums


def rloo_row(row: RowInputs, micro: MicroBatch, config, num_items: float) -> tuple[torch.Tensor, dict]:
    """RLOO's loss of one row (TRL's clipped ratio of summed completion log-probs, its share of the
    micro-batch's mean) and its metric sums (clip shares over completions, as TRL counts them)."""
    logps = segment_sum(row.logprobs * row.mask, cu_seqlens=row.cu)
    old = segment_sum(row.old * row.mask, cu_seqlens=row.cu)
    loss, metrics = rloo_loss(logps, old, row.advantages, epsilon=config.epsilon, epsilon_high=config.epsilon_high)
    n = float(row.size)
    sums = {name: (float(metrics[name]) * n, n) for name in CLIP_MEANS}
    sums.update(_extremes(metrics))
    sums["entropy"] = _masked(row.entropy, row.mask)
    return loss * (row.size / micro.size), sums


class StepMetrics:
    """An optimizer step's objective metrics: per micro-batch, the sums of every row on every
    process (TRL's global means per micro-batch; its extremes over every completion), then the
    mean over the step's micro-batches. One all-reduce and one all-gather per step; every process
    adds the same names (each has a row in every micro-batch)."""

    def __init__(self):
        self.micro: list[dict] = []

    def start_micro_batch(self) -> None:
        self.micro.append({})

    def add(self, sums: dict) -> None:
        into = self.micro[-1]
        for name, (a, b) in sums.items():
            if name in EXTREMES:
                into[name] = _extreme(EXTREMES[name], into.get(name, float("nan")), b)
            else:
                old = into.get(name, (0.0, 0.0))
                into[name] = (old[0] + a, old[1] + b)

    def reduce(self, device: torch.device) -> dict:
        """The step's metrics, ``{name: mean over micro-batches}``; clears the sums."""
        micro, self.micro = self.micro, []
        means = sorted(n for n in micro[0] if n not in EXTREMES)
        extremes = sorted(n for n in micro[0] if n in EXTREMES)
        totals = distributed.all_reduce_sum([x for m in micro for n in means for x in m[n]], device)
        seen = distributed.all_gather_floats([m[n] for m in micro for n in extremes], device)
        out = {n: [] for n in means + extremes}
        for j in range(len(micro)):
            for i, n in enumerate(means):
                num, den = totals[2 * (j * len(means) + i)], totals[2 * (j * len(means) + i) + 1]
                out[n].append(num / den if den else float("nan"))
        per_process = len(micro) * len(extremes)
        for j in range(len(micro)):
            for i, n in enumerate(extremes):
                value = float("nan")
                for p in range(len(seen) // max(per_process, 1)):
                    value = _extreme(EXTREMES[n], value, seen[p * per_process + j * len(extremes) + i])
                out[n].append(value)
        return {n: _nanmean(v) for n, v in out.items()}


EXTREMES = {"clip_ratio/low_min": "min", "clip_ratio/high_max": "max"}


def _extreme(kind: str, a: float, b: float) -> float:
    """min or max of two values, NaN standing for none."""
    if a != a:
        return b
    if b != b:
        return a
    return min(a, b) if kind == "min" else max(a, b)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")
