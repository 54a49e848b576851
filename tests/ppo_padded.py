"""A plain-torch, padded-batch PPO step: the reference that fastalign's packed PPOTrainer is tested
(and benchmarked) against.

It reproduces, operation for operation, one call of ``PPOTrainer.step`` from Hugging Face TRL
0.7.10 (``trl/trainer/ppo_trainer.py`` and ``trl/core.py``) for a decoder-only model on a single
process, with these inputs fixed by the caller instead of drawn inside the step:

* ``permutations`` replaces the per-epoch ``np.random.permutation``;
* ``scores`` are taken as final (no score scaling, normalisation or clipping here);
* the KL coefficient is a plain number (the adaptive controller's update happens after the step in
  TRL and does not touch anything computed in it).

One intentional departure, in ``compute_advantages``: whitened rewards are multiplied by the mask
again (see there). Otherwise the arithmetic is TRL's; the code and comments are our own.

Nothing here imports fastalign or its kernels: only torch and the standard library.
"""

import math
import time
import warnings

import torch

__all__ = [
    "compute_advantages", "entropy_from_logits", "kl_penalty_per_token", "masked_mean", "masked_var",
    "masked_whiten", "padded_ppo_step", "token_logprobs",
]


# ----------------------------------------------------------------------------------------------
# Masked statistics (TRL core semantics)
# ----------------------------------------------------------------------------------------------

def masked_mean(x, mask):
    """Mean of ``x`` over the entries where ``mask`` is 1 (whole tensor, no axis)."""
    return (x * mask).sum() / mask.sum()


def masked_var(x, mask, unbiased=True):
    """Variance of ``x`` over the mask; unbiased means the n/(n-1) Bessel factor with n = mask.sum()."""
    centred = x - masked_mean(x, mask)
    var = masked_mean(centred ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n == 0:
            raise ValueError("masked_var: the mask selects no entries")
        # n == 1 divides by zero (inf), exactly as the reference implementation does.
        var = var * (n / (n - 1))
    return var


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / sqrt(var + 1e-8) over the mask; with shift_mean=False the mean is added back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out


def entropy_from_logits(logits):
    """Per-position entropy of softmax(logits): logsumexp(z) - sum(softmax(z) * z)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def token_logprobs(logits, labels):
    """log softmax over the vocabulary, picked at ``labels`` ([B, T, V], [B, T] -> [B, T])."""
    return torch.log_softmax(logits, dim=2).gather(2, labels.unsqueeze(2)).squeeze(-1)


def kl_penalty_per_token(kind, logprob, ref_logprob):
    """The per-token KL estimate used in the reward.

    For "kl", "abs" and "mse" the arguments are gathered log-probs ([..., T]); for "full" they are
    full log-softmax rows ([..., T, V]) and the result is KL(policy || ref) summed over the vocabulary.
    """
    if kind == "kl":
        return logprob - ref_logprob
    if kind == "abs":
        return (logprob - ref_logprob).abs()
    if kind == "mse":
        return 0.5 * (logprob - ref_logprob).square()
    if kind == "full":
        # Elementwise p * (log p - log q), the same pointwise term as
        # F.kl_div(input=log q, target=log p, log_target=True), summed over the vocabulary.
        return (logprob.exp() * (logprob - ref_logprob)).sum(-1)
    raise NotImplementedError(f"unknown kl_penalty {kind!r}")


# ----------------------------------------------------------------------------------------------
# Rewards and advantages
# ----------------------------------------------------------------------------------------------

def compute_rewards(scores, kls, masks, kl_coef):
    """Per-token rewards: -kl_coef * kl everywhere, plus the score at the last masked-in position."""
    rewards, non_score = [], []
    for score, kl, mask in zip(scores, kls, masks):
        ns = -kl_coef * kl
        non_score.append(ns)
        r = ns.clone()
        last = mask.nonzero()[-1]  # raises on an all-zero row, like the reference
        r[last] += score
        rewards.append(r)
    return torch.stack(rewards), torch.stack(non_score)


def compute_advantages(values, rewards, mask, *, gamma, lam, whiten_rewards=False):
    """GAE over the whole padded width, then whitened advantages.

    Returns ``(masked values, whitened advantages, returns)`` with returns = raw GAE + masked values.
    """
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
        # Deliberate difference from TRL 0.7.10: there the whitened rewards are NOT masked again, so
        # padding (and any masked-out response token) carries the value "+mean - mean/std" into the
        # backward recursion and leaks into the advantages of the real tokens before it. Re-masking
        # makes the result independent of how much padding a row has, which a packed implementation
        # (no padding at all) needs in order to be compared with this one.
        rewards = rewards * mask

    width = rewards.shape[-1]
    carry = 0.0
    reversed_adv = []
    for t in range(width - 1, -1, -1):
        v_next = values[:, t + 1] if t < width - 1 else 0.0
        delta = rewards[:, t] + gamma * v_next - values[:, t]
        carry = delta + gamma * lam * carry
        reversed_adv.append(carry)
    advantages = torch.stack(reversed_adv[::-1]).transpose(0, 1)

    returns = advantages + values
    advantages = masked_whiten(advantages, mask).detach()
    return values, advantages, returns


# ----------------------------------------------------------------------------------------------
# Forward passes
# ----------------------------------------------------------------------------------------------

def _pad_inputs(queries, responses, pad_token_id, device):
    seqs = [torch.cat([q, r]) for q, r in zip(queries, responses)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = s.to(device)
        attention_mask[i, :len(s)] = 1
    return input_ids, attention_mask


def _response_masks(attention_mask, queries, responses, response_masks):
    """[B, L-1] mask over the shifted (next-token) positions: 1 exactly on response predictions."""
    masks = attention_mask[:, 1:].clone()
    for j, (q, r) in enumerate(zip(queries, responses)):
        start = len(q) - 1  # position whose logits predict the first response token
        end = start + len(r)
        masks[j, :start] = 0
        masks[j, end:] = 0
        if response_masks is not None:
            rm = response_masks[j].to(masks.device)
            masks[j, start:end] = masks[j, start:end] * rm
    return masks


def _policy_forward(model, input_ids, attention_mask):
    logits, _, values = model(input_ids=input_ids, attention_mask=attention_mask)
    # TRL's value-head wrapper hands back fp32 logits whatever the model's dtype.
    return logits.float(), values


def _ref_forward(ref_model, input_ids, attention_mask):
    return ref_model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def _rollout(forward, net, input_ids, attention_mask, chunk, keep_logits):
    """Chunked no-grad forward over the batch (TRL runs the rollout in mini_batch_size chunks, with
    the network switched to eval mode). Returns gathered log-probs [B, L-1], the logits [B, L-1, V]
    if asked for, and the values [B, L-1] (None for the reference)."""
    net.eval()
    lps, logits_all, vals = [], [], []
    for i in range(math.ceil(input_ids.shape[0] / chunk)):
        sl = slice(i * chunk, (i + 1) * chunk)
        ids = input_ids[sl]
        out = forward(net, ids, attention_mask[sl])
        logits, values = out if isinstance(out, tuple) else (out, None)
        lps.append(token_logprobs(logits[:, :-1, :], ids[:, 1:]))
        if keep_logits:
            logits_all.append(logits[:, :-1])
        if values is not None:
            vals.append(values[:, :-1])
    return (torch.cat(lps), torch.cat(logits_all) if keep_logits else None,
            torch.cat(vals) if vals else None)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# The PPO loss of one mini-batch
# ----------------------------------------------------------------------------------------------

def _minibatch_loss(old_logprobs, old_values, logits, vpreds, logprobs, mask, advantages, returns,
                    *, cliprange, cliprange_value, vf_coef, ratio_threshold):
    v_lo, v_hi = old_values - cliprange_value, old_values + cliprange_value
    vpred_clipped = torch.max(torch.min(vpreds, v_hi), v_lo)
    vf_unclipped = (vpreds - returns) ** 2
    vf_clipped = (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_unclipped, vf_clipped), mask)
    vf_clipfrac = masked_mean(torch.gt(vf_clipped, vf_unclipped).float(), mask)

    ratio = torch.exp(logprobs - old_logprobs)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_unclipped, pg_clipped), mask)
    pg_clipfrac = masked_mean(torch.gt(pg_clipped, pg_unclipped).float(), mask)

    loss = pg_loss + vf_coef * vf_loss

    mean_ratio = masked_mean(ratio, mask).item()
    if mean_ratio > ratio_threshold:
        warnings.warn(f"mean importance ratio {mean_ratio:.2f} is above ratio_threshold "
                      f"{ratio_threshold:.2f}: this mini-batch contributes no gradient")
        pg_loss = pg_loss * 0.0
        vf_loss = vf_loss * 0.0
        loss = loss * 0.0

    stats = {
        "loss/policy": pg_loss.detach(),
        "loss/value": vf_loss.detach(),
        "loss/total": loss.detach(),
        "policy/entropy": masked_mean(entropy_from_logits(logits), mask).detach(),
        "policy/approxkl": (0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)).detach(),
        "policy/policykl": masked_mean(old_logprobs - logprobs, mask).detach(),
        "policy/clipfrac": pg_clipfrac.detach(),
        "policy/advantages_mean": masked_mean(advantages, mask).detach(),
        "returns/mean": masked_mean(returns, mask).detach(),
        "returns/var": masked_var(returns, mask).detach(),
        "val/vpred": masked_mean(vpreds, mask).detach(),
        "val/error": masked_mean((vpreds - returns) ** 2, mask).detach(),
        "val/clipfrac": vf_clipfrac.detach(),
        "val/mean": masked_mean(old_values, mask).detach(),
        "val/var": masked_var(old_values, mask).detach(),
    }
    # TRL backpropagates pg_loss + (vf_coef * vf_loss), i.e. the same total as `loss`.
    return loss, stats


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------

def padded_ppo_step(model, ref_model, optimizer, queries, responses, scores, *, kl_coef, permutations,
                    kl_penalty="kl", gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
                    whiten_rewards=False, mini_batch_size=1, gradient_accumulation_steps=1, ppo_epochs=4,
                    early_stopping=False, target_kl=1.0, ratio_threshold=10.0, max_grad_norm=None,
                    response_masks=None, pad_token_id=0, timings=None) -> dict:
    """One TRL-0.7.10 PPO step on a right-padded batch; updates ``model`` through ``optimizer``.

    ``model(input_ids=, attention_mask=)`` -> (logits [B, L, V], _, values [B, L]);
    ``ref_model(input_ids=, attention_mask=).logits`` -> [B, L, V]. ``queries``/``responses`` are
    lists of unpadded 1-D LongTensors, ``scores`` a [B] float tensor, ``permutations[e]`` the sample
    order of epoch ``e``. Returns the mini-batch statistics averaged over the mini-batches run
    (``ppo/...``), the rollout statistics (``objective/...``, ``ppo/mean_scores``, ...), ``epochs_run``
    and, per sample, the fp32 response-position slices of logprobs, ref_logprobs, values, rewards,
    non_score_rewards, kls, advantages, returns and masks (lists of length-len(response) tensors).
    If ``timings`` is a dict, the seconds of the four phases are written into it.
    """
    device = next(model.parameters()).device
    bs = len(queries)
    if len(responses) != bs or len(scores) != bs:
        raise ValueError("queries, responses and scores must have the same length")
    if len(permutations) < ppo_epochs:
        raise ValueError(f"need {ppo_epochs} permutations, got {len(permutations)}")
    backward_bs = mini_batch_size * gradient_accumulation_steps
    if ppo_epochs > 0 and bs % backward_bs != 0:  # TRL's PPOConfig refuses such a batch size
        raise ValueError("batch size must be a multiple of mini_batch_size * gradient_accumulation_steps")
    queries = [q.to(device) for q in queries]
    responses = [r.to(device) for r in responses]
    scores = torch.as_tensor(scores).to(device)
    if response_masks is not None:
        response_masks = [m.to(device) for m in response_masks]
    full_kl = kl_penalty == "full"
    clock = {}

    # --- rollout: policy and reference log-probs, values, response masks ----------------------
    if timings is not None:
        _sync(device)
    t = time.perf_counter()
    input_ids, attention_mask = _pad_inputs(queries, responses, pad_token_id, device)
    masks = _response_masks(attention_mask, queries, responses, response_masks)
    with torch.no_grad():
        all_logprobs, logits_or_none, raw_values = _rollout(
            _policy_forward, model, input_ids, attention_mask, mini_batch_size, full_kl)
        ref_logprobs, ref_logits_or_none, _ = _rollout(
            _ref_forward, ref_model, input_ids, attention_mask, mini_batch_size, full_kl)
    if timings is not None:
        _sync(device)
    clock["forward_pass"] = time.perf_counter() - t

    with torch.no_grad():
        t = time.perf_counter()
        if full_kl:
            kls = kl_penalty_per_token("full", torch.log_softmax(logits_or_none, dim=2),
                                       torch.log_softmax(ref_logits_or_none, dim=2))
        else:
            kls = kl_penalty_per_token(kl_penalty, all_logprobs, ref_logprobs)
        rewards, non_score = compute_rewards(scores, kls, masks, kl_coef)
        if timings is not None:
            _sync(device)
        clock["compute_rewards"] = time.perf_counter() - t

        t = time.perf_counter()
        values, advantages, returns = compute_advantages(
            raw_values, rewards, masks, gamma=gamma, lam=lam, whiten_rewards=whiten_rewards)
        if timings is not None:
            _sync(device)
        clock["compute_advantages"] = time.perf_counter() - t
    del logits_or_none, ref_logits_or_none

    old_logprobs = all_logprobs.to(torch.float32)
    old_values = values.to(torch.float32)

    # --- PPO epochs ---------------------------------------------------------------------------
    t = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    all_stats = []
    epochs_run = 0
    for epoch in range(ppo_epochs):
        order = torch.as_tensor(permutations[epoch], dtype=torch.long).tolist()
        if sorted(order) != list(range(bs)):
            raise ValueError(f"permutations[{epoch}] is not a permutation of range({bs})")
        for bstart in range(0, bs, backward_bs):
            backward_inds = order[bstart:bstart + backward_bs]
            for k, mstart in enumerate(range(0, backward_bs, mini_batch_size)):
                idx = torch.tensor(backward_inds[mstart:mstart + mini_batch_size], device=device)
                ids, att = input_ids[idx], attention_mask[idx]
                # TRL's batched_forward_pass switches the model to eval() before every forward,
                # including this one with gradients; train() is only set afterwards (before the
                # loss), so the gradient forward runs with dropout off.
                model.eval()
                logits, vpreds = _policy_forward(model, ids, att)
                logits, vpreds = logits[:, :-1], vpreds[:, :-1]
                new_logprobs = token_logprobs(logits, ids[:, 1:])
                model.train()
                loss, stats = _minibatch_loss(
                    old_logprobs[idx], old_values[idx], logits, vpreds, new_logprobs, masks[idx],
                    advantages[idx], returns[idx], cliprange=cliprange, cliprange_value=cliprange_value,
                    vf_coef=vf_coef, ratio_threshold=ratio_threshold)
                (loss / gradient_accumulation_steps).backward()
                if k == gradient_accumulation_steps - 1:  # last mini-batch of the backward batch
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                all_stats.append(stats)
        epochs_run += 1
        # Early stopping is checked once per epoch, on the last mini-batch's policy KL.
        if early_stopping and all_stats[-1]["policy/policykl"] > 1.5 * target_kl:
            optimizer.zero_grad()
            break
    if timings is not None:
        _sync(device)
    clock["optimize_step"] = time.perf_counter() - t
    if timings is not None:
        timings.update(clock)

    # --- statistics ---------------------------------------------------------------------------
    out = {}
    if all_stats:
        for key in all_stats[0]:
            out[f"ppo/{key}"] = torch.stack([s[key].float() for s in all_stats]).mean().item()
        out["ppo/val/var_explained"] = 1 - out["ppo/val/error"] / out["ppo/returns/var"]
    out["objective/kl"] = (kls * masks).sum(dim=-1).mean().item()
    out["objective/kl_coef"] = kl_coef
    out["objective/entropy"] = (-all_logprobs * masks).sum(dim=-1).mean().item()
    out["ppo/mean_non_score_reward"] = masked_mean(non_score, masks).item()
    out["ppo/mean_scores"] = scores.mean().item()
    out["ppo/std_scores"] = scores.std().item()
    out["epochs_run"] = epochs_run

    per_sample = {
        "logprobs": all_logprobs, "ref_logprobs": ref_logprobs,
        # values as the loss sees them: the value head's output times the mask
        "values": values,
        # rewards straight from the reward computation (before compute_advantages masks/whitens them)
        "rewards": rewards, "non_score_rewards": non_score, "kls": kls,
        "advantages": advantages, "returns": returns, "masks": masks,
    }
    for name, tensor in per_sample.items():
        rows = []
        for j, (q, r) in enumerate(zip(queries, responses)):
            start = len(q) - 1
            rows.append(tensor[j, start:start + len(r)].detach().to(torch.float32))
        out[name] = rows
    return out
