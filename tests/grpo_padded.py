"""A plain-torch, padded-batch GRPO / RLOO step in TRL 1.16's way: the reference that fastalign's
packed trainers are tested (and benchmarked) against.

It follows ``GRPOTrainer._generate_and_score_completions`` / ``_compute_loss`` and
``RLOOTrainer``'s from TRL 1.16 for a decoder-only model on one process: prompts left-padded and
completions right-padded into one ``[B, P + C]`` batch, the model run over all of it, the
log-probs (at ``temperature``) taken at the completion positions from full logits; the
advantages from the rewards per group; then ``steps_per_generation`` micro-batches of the
shuffled generation (``order``), each loss scaled as TRL scales it, ``num_iterations`` times over.
Two things are given instead of drawn: the completions and the shuffle. And one thing differs
from TRL 1.16 on purpose: ``position_ids`` are counted from each row's first real token, as
generation counts them (TRL's training forward counts them from the padded row's first column, so
a left-padded prompt sits at other positions than when it was sampled).

Nothing here imports fastalign: only torch.
"""

from __future__ import annotations

import time

import torch

__all__ = ["grpo_advantages", "padded_batch", "padded_logprobs", "padded_steps", "rloo_advantages"]


def padded_batch(prompts: list[torch.Tensor], completions: list[torch.Tensor], pad_token_id: int):
    """``(ids [B, P+C], attention [B, P+C], completion mask [B, C], P)``: prompts left-padded to
    ``P``, completions right-padded to ``C``."""
    P, C = max(len(p) for p in prompts), max(len(c) for c in completions)
    ids = torch.full((len(prompts), P + C), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, P - len(p):P], ids[b, P:P + len(c)] = p, c
        attention[b, P - len(p):P + len(c)] = 1
    return ids, attention, attention[:, P:].float(), P


def padded_logprobs(model, ids, attention, P: int, temperature: float = 1.0, entropy: bool = False):
    """Per-token log-probs ``[B, C]`` of the completion tokens (and the entropies), from full logits."""
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False).logits
    logits = logits[:, P - 1:-1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return picked
    return picked, -(logp.exp() * logp).sum(-1)


def _nanstd(x: torch.Tensor, dim=None) -> torch.Tensor:
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim)
    return (torch.nansum((x - mean) ** 2, dim=dim) / (count - 1)).sqrt()


def grpo_advantages(rewards: torch.Tensor, G: int, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16's ``sum_then_normalize`` advantages of summed rewards ``[N]``."""
    grouped = rewards.view(-1, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(G)
    std = _nanstd(rewards).expand_as(rewards) if scale_rewards == "batch" else _nanstd(grouped, 1).repeat_interleave(G)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_advantages(rewards: torch.Tensor, G: int, normalize: bool) -> torch.Tensor:
    """TRL 1.16's leave-one-out advantages of (KL-penalised) rewards ``[N]``."""
    grouped = rewards.view(-1, G)
    baselines = ((grouped.sum(1, keepdim=True) - grouped) / (G - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    return advantages


def _grpo_loss(logp, old, ref, adv, mask, c, num_items) -> torch.Tensor:
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - c.epsilon, 1 + (c.epsilon if c.epsilon_high is None else c.epsilon_high))
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    if c.beta != 0.0:
        per_token = per_token + c.beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    ga = c.gradient_accumulation_steps
    if c.loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
    if c.loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / ga
    if c.loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * c.max_completion_length) / ga
    return (per_token * mask).sum() / (num_items.clamp(min=1.0) * ga / c.steps_per_generation)  # dapo


def _rloo_loss(logp, old, adv, mask, c) -> torch.Tensor:
    coef_1 = torch.exp((logp * mask).sum(1) - (old * mask).sum(1))
    coef_2 = torch.clamp(coef_1, 1 - c.epsilon, 1 + (c.epsilon if c.epsilon_high is None else c.epsilon_high))
    return -torch.min(coef_1 * adv, coef_2 * adv).mean() / c.gradient_accumulation_steps


def padded_steps(policy, reference, optimizer, prompts, completions, rewards: torch.Tensor, order: list[int], config,
                 steps: int, *, algorithm: str = "grpo", pad_token_id: int = 0, truncated: torch.Tensor | None = None,
                 max_grad_norm: float | None = 1.0, timings: dict | None = None,
                 logprobs=padded_logprobs) -> torch.Tensor:
    """``steps`` optimizer steps on one generation (``rewards [N]``: summed over functions);
    returns the advantages. ``truncated [N]`` (bool) zeroes those completions' mask with
    ``mask_truncated_completions``. ``timings``, if a dict, gets the seconds of the forwards
    (``logprobs``) and of the loss passes and optimizer steps (``optimization``). ``logprobs``:
    the forward, ``padded_logprobs``'s signature (a fused head plugs in there); the loss passes
    take the entropies too, as TRL's do."""
    c, ga, spg = config, config.gradient_accumulation_steps, config.steps_per_generation
    t0 = time.perf_counter()
    ids, attention, mask, P = padded_batch(prompts, completions, pad_token_id)
    if c.mask_truncated_completions and truncated is not None:
        mask = mask * (~truncated).float()[:, None]
    need_old = algorithm == "rloo" or ga % (spg * c.num_iterations) != 0
    with torch.no_grad():
        old = logprobs(policy, ids, attention, P, c.temperature) if need_old else None
        ref = logprobs(reference, ids, attention, P, c.temperature) if c.beta != 0.0 else None
    if algorithm == "grpo":
        advantages = grpo_advantages(rewards, c.num_generations, c.scale_rewards)
    else:
        penalised = rewards - c.beta * ((old - ref) * mask).sum(1) if c.beta != 0.0 else rewards
        advantages = rloo_advantages(penalised, c.num_generations, c.normalize_advantages)
    num_items = mask.sum()
    t1 = time.perf_counter()
    size = len(order) // spg
    for step in range(steps):
        for j in range(ga):
            part = (step * ga + j) % spg
            idx = torch.tensor(order[part * size:(part + 1) * size])
            logp, _ = logprobs(policy, ids[idx], attention[idx], P, c.temperature, entropy=True)
            old_i = logp.detach() if old is None else old[idx]
            if algorithm == "grpo":
                loss = _grpo_loss(logp, old_i, None if ref is None else ref[idx], advantages[idx], mask[idx], c, num_items)
            else:
                loss = _rloo_loss(logp, old_i, advantages[idx], mask[idx], c)
            loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if timings is not None:
        timings["logprobs"], timings["optimization"] = t1 - t0, time.perf_counter() - t1
    return advantages


class FixedGenerator:
    """A stand-in ``Generator``: completions drawn from a seed made of the prompt's tokens and the
    completion's place in its group, so the same prompt always gets the same group, however the
    prompts are batched or split over processes. One in three ends with ``eos_token_id``; the
    others run ``max_new_tokens`` long (cut, "truncated")."""

    def __init__(self, vocab: int, eos_token_id: int = 2, seed: int = 0):
        self.vocab, self.eos, self.seed = vocab, eos_token_id, seed

    def generate(self, prompt_ids, n, **sampling):
        out = []
        for p in prompt_ids:
            for i in range(n):
                key = (self.seed * 1_000_003 + sum((k + 1) * int(t) for k, t in enumerate(p.tolist())) * 31 + i) % 2**62
                g = torch.Generator().manual_seed(key)
                limit = sampling["max_new_tokens"]
                if int(torch.randint(3, (1,), generator=g)) == 0:
                    length = int(torch.randint(1, limit + 1, (1,), generator=g))
                    tokens = torch.randint(4, self.vocab, (length - 1,), generator=g)
                    out.append(torch.cat([tokens, torch.tensor([self.eos])]))
                else:
                    out.append(torch.randint(4, self.vocab, (limit,), generator=g))
        return out


def token_reward(prompts, completions, completion_ids, **kwargs):
    """A reward in TRL's keyword form: the share of a completion's ids that are even."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def length_reward(prompts, completions):
    """A reward in the plain two-list form: the completion's length in characters, over 10."""
    return [len(c) / 10 for c in completions]
