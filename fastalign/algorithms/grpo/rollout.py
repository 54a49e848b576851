"""The rollout GRPO and RLOO share: prompts drawn, completions sampled, scored, and the per-token
log-probs the objective needs, on the packed core.

``Rollouts.make(generation)`` runs one generation for this process's share of completions:

1. its prompts (``PromptSampler``), each repeated ``num_generations`` times, and their completions
   from the ``Generator``;
2. their rewards, one column per reward function (texts decoded for functions, packed
   prompt+completion rows for reward models), gathered from every process: a group may span two;
3. one packed forward of the policy (the old log-probs, only when a generation outlives an
   optimizer step) and of the reference (only when ``beta`` is not 0) per row of at most
   ``max_tokens_per_batch`` tokens: prompt+completion laid end to end without padding, the
   lm_head fused with the log-prob at completion tokens only, never a ``[tokens, vocab]`` tensor;
4. the algorithm's advantages from all of that (``advantages(scored) -> (local advantages,
   metrics)``), and TRL's completion metrics.

What it returns, a ``Rollout``, holds per completion token (flat, completion after completion,
``RolloutLayout``) the mask and the log-probs, and per completion its advantage; its micro-batches
are the shuffled completions cut into ``steps_per_generation`` equal parts.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fastalign.data import IGNORE_INDEX, Sequence, pack, plan_batches
from fastalign.engine import distributed
from fastalign.models import eval_mode, head_logprobs, packed_hidden, packed_scores

from ..ppo.rollout import RolloutLayout
from .prompts import PromptSampler, cut_prompt


def equal_rows(units: list[list[Sequence]], max_tokens: int, device: torch.device) -> Iterator[tuple[list[int], object]]:
    """``(unit indices, packed row on device)`` per row of at most ``max_tokens`` tokens. Every
    process yields as many rows as the busiest (ZeRO-3 runs every forward on every process): the
    extra ones repeat the first row with no units, to be weighted 0."""
    plan = plan_batches([sum(len(s.input_ids) for s in unit) for unit in units], max_tokens)
    rows = distributed.all_reduce_max(len(plan), device)
    for k in range(rows):
        own = plan[k] if k < len(plan) else []
        yield own, pack([units[i] for i in (own or plan[0])]).to(device)


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Every process's ``[n, ...]`` rows (the same ``n`` on each), in rank order, on the CPU."""
    flat = distributed.all_gather_floats(values.reshape(-1).tolist(), values.device)
    return torch.tensor(flat, dtype=torch.float32).reshape(-1, *values.shape[1:])


def nanstd(x: torch.Tensor) -> float:
    """The sample standard deviation over the non-NaN values (NaN below two)."""
    keep = x[~torch.isnan(x)]
    return float(keep.std()) if keep.numel() > 1 else float("nan")


@dataclass
class Scored:
    """What the advantages are computed from: ``rewards`` (fp32 ``[N, F]``, every process's
    completions, per reward function), the process's ``first`` completion in that list and
    ``layout``, and per completion token the ``mask``, ``old_logprobs`` and ``ref_logprobs``
    (None when not computed)."""

    rewards: torch.Tensor
    first: int
    layout: RolloutLayout
    mask: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None

    @property
    def local(self) -> slice:
        return slice(self.first, self.first + len(self.layout.responses))


@dataclass
class Rollout:
    """One process's share of a generation, ready for the objective (see the module docstring);
    ``num_items``: the mask's tokens over every process; ``order``: the completions, shuffled."""

    layout: RolloutLayout
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    num_items: float
    order: list[int]

    @functools.cached_property
    def units(self) -> list[list[Sequence]]:
        """Each completion as a packing unit: prompt+completion, the loss at the completion."""
        return self.layout.units()

    def micro_batch(self, part: int, parts: int) -> list[int]:
        size = len(self.order) // parts
        return self.order[part * size:(part + 1) * size]

    def state(self) -> dict:
        """Tensors and plain values (a checkpoint's)."""
        lay = self.layout
        return {"queries": torch.cat(lay.queries).cpu(), "query_lengths": [len(q) for q in lay.queries],
                "responses": torch.cat(lay.responses).cpu(), "response_lengths": [len(r) for r in lay.responses],
                "mask": self.mask.cpu(), "advantages": self.advantages.cpu(), "num_items": self.num_items,
                "order": self.order, "old": _cpu(self.old_logprobs), "ref": _cpu(self.ref_logprobs)}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> Rollout:
        queries = list(torch.split(state["queries"], state["query_lengths"]))
        responses = list(torch.split(state["responses"], state["response_lengths"]))
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return cls(RolloutLayout.of(queries, responses, device), move(state["mask"]), move(state["advantages"]),
                   move(state["old"]), move(state["ref"]), state["num_items"], list(state["order"]))


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


class Rollouts:
    """Makes one process's ``Rollout`` per generation (see the module docstring).

    ``policy``: the trained model (run through ``engine.forward``); ``reference``: the frozen model
    the KL is taken to, entered with ``reference_context()`` (the policy with its adapters off, for
    a PEFT model), or None (``beta`` 0: no reference forward at all); ``old_logprobs``: whether the
    policy's log-probs are recorded (a generation serving several optimizer steps needs them);
    ``advantages(scored)``: the algorithm's ``(this process's advantages [n], metrics)``."""

    def __init__(self, config, engine, policy, reference, reference_context: Callable, rewards, generator,
                 tokenizer, dataset, sampler: PromptSampler, old_logprobs: bool,
                 advantages: Callable[[Scored], tuple[torch.Tensor, dict]]):
        self.config, self.engine, self.policy, self.reference = config, engine, policy, reference
        self.reference_context, self.rewards, self.generator = reference_context, rewards, generator
        self.tokenizer, self.dataset, self.sampler = tokenizer, dataset, sampler
        self.old_logprobs, self.advantages = old_logprobs, advantages
        self.ends = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}

    # ---- 1. prompts and completions --------------------------------------------------------------
    def _completions(self, rows: list[int], prompts: list[torch.Tensor], sampling: dict) -> list[torch.Tensor]:
        """The generator's completions, one per entry of ``rows``: whole groups in one call with
        ``n`` = the group size; a share that cuts a group (a group spanning two processes), one
        completion per entry."""
        starts = [k for k in range(len(rows)) if k == 0 or rows[k] != rows[k - 1]]
        sizes = {b - a for a, b in zip(starts, starts[1:] + [len(rows)])}
        if len(sizes) == 1:
            out = self.generator.generate([prompts[k] for k in starts], sizes.pop(), **sampling)
        else:
            out = self.generator.generate(prompts, 1, **sampling)
        if len(out) != len(prompts):
            raise ValueError(f"the generator returned {len(out)} completions for {len(prompts)}")
        return [torch.as_tensor(c).reshape(-1).long().cpu() for c in out]

    # ---- 2. rewards ------------------------------------------------------------------------------
    def _model_scores(self, prompts: list[torch.Tensor], completions: list[torch.Tensor]) -> Callable:
        units = [[Sequence(torch.cat([p, c]).tolist())] for p, c in zip(prompts, completions)]

        def scores(model: torch.nn.Module) -> torch.Tensor:
            out = torch.zeros(len(units))
            with torch.no_grad(), self.engine.autocast():
                for own, batch in equal_rows(units, self.config.max_tokens_per_batch, self.engine.device):
                    values = packed_scores(model, batch)
                    if own:
                        out[own] = values.float().cpu()
            return out

        return scores

    # ---- 3. log-probs at completion tokens -------------------------------------------------------
    def _policy_logprobs(self, batch, pos: torch.Tensor) -> torch.Tensor:
        hidden = packed_hidden(self.policy, batch)[pos]
        return head_logprobs(self.policy, hidden, batch.labels[pos], self.config.temperature)

    def _reference_logprobs(self, batch, pos: torch.Tensor) -> torch.Tensor:
        with self.reference_context():
            hidden = packed_hidden(self.reference, batch)[pos]
            return head_logprobs(self.reference, hidden, batch.labels[pos], self.config.temperature)

    def logprobs(self, layout: RolloutLayout) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(old, ref)`` fp32 ``[M]`` at every completion token (None: not wanted), from one
        packed forward of each model per row."""
        want_ref = self.reference is not None
        if not (self.old_logprobs or want_ref):
            return None, None
        device = self.engine.device
        old = torch.zeros(layout.num_tokens, device=device) if self.old_logprobs else None
        ref = torch.zeros(layout.num_tokens, device=device) if want_ref else None
        with torch.no_grad(), eval_mode(self.policy):
            for own, batch in equal_rows(layout.units(), self.config.max_tokens_per_batch, device):
                pos = (batch.labels != IGNORE_INDEX).nonzero()[:, 0]
                with self.engine.autocast():
                    lp = self.engine.forward(self._policy_logprobs, batch, pos) if old is not None else None
                    rp = self._reference_logprobs(batch, pos) if want_ref else None
                if own:
                    dest = layout.positions(own)
                    if old is not None:
                        old[dest] = lp.float()
                    if ref is not None:
                        ref[dest] = rp.float()
        return old, ref

    # ---- the whole generation --------------------------------------------------------------------
    def make(self, generation: int, sampling: dict) -> tuple[Rollout, dict]:
        """Generation number ``generation`` (counted from the run's start): this process's
        ``Rollout`` and the generation's metrics (every process's, TRL's names)."""
        c, device = self.config, self.engine.device
        watch = time.perf_counter()
        draw = self.sampler.draw(generation)
        rows = [self.dataset[i] for i in draw.rows]
        prompts = [cut_prompt(torch.as_tensor(r["input_ids"]).reshape(-1).long(), c.max_prompt_length)[0] for r in rows]
        completions = self._completions(draw.rows, prompts, sampling)
        times = {"time/generation": time.perf_counter() - watch}

        watch = time.perf_counter()
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("query", "prompt", "input_ids")}
        per_func = self.rewards.score([r["query"] for r in rows], texts, [t.tolist() for t in completions], columns,
                                      self._model_scores(prompts, completions))
        lengths = torch.tensor([float(len(t)) for t in completions])
        truncated = torch.tensor([float(len(t) > 0 and int(t[-1]) not in self.ends) for t in completions])
        prompt_lengths = torch.tensor([float(len(p)) for p in prompts])
        everyone = gather_rows(torch.cat([per_func, torch.stack([lengths, truncated, prompt_lengths], 1)], 1).to(device))
        rewards, lengths_all, truncated_all = everyone[:, :-3], everyone[:, -3], everyone[:, -2].bool()
        times["time/scoring"] = time.perf_counter() - watch

        watch = time.perf_counter()
        layout = RolloutLayout.of(prompts, completions, device)
        keep = (1.0 - truncated) if c.mask_truncated_completions else torch.ones(len(completions))
        mask = keep.repeat_interleave(lengths.long()).to(device)
        old, ref = self.logprobs(layout)
        times["time/logprobs"] = time.perf_counter() - watch

        advantages, metrics = self.advantages(Scored(rewards, draw.first, layout, mask, old, ref))
        num_items = distributed.all_reduce_sum([float(mask.sum())], device)[0]
        order = torch.randperm(len(completions), generator=torch.Generator().manual_seed(c.seed + generation)).tolist()
        rollout = Rollout(layout, mask, advantages.to(device), old, ref, num_items, order)
        return rollout, {**self._metrics(rewards, lengths_all, truncated_all, everyone[:, -1]), **metrics, **times}

    def _metrics(self, rewards: torch.Tensor, lengths: torch.Tensor, truncated: torch.Tensor,
                 prompt_lengths: torch.Tensor) -> dict:
        """TRL's completion and per-function reward metrics over every process's completions."""
        ended = lengths[~truncated] if (~truncated).any() else torch.zeros(1)
        out = {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
               "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float(truncated.float().mean()),
               "completions/mean_terminated_length": float(ended.mean()),
               "completions/min_terminated_length": float(ended.min()),
               "completions/max_terminated_length": float(ended.max()),
               "tokens": float(lengths.sum() + prompt_lengths.sum())}
        for i, name in enumerate(self.rewards.names):
            out[f"rewards/{name}/mean"] = float(torch.nanmean(rewards[:, i]))
            out[f"rewards/{name}/std"] = nanstd(rewards[:, i])
        return out
