"""RL statistics, KL penalties, reward shaping and the PPO loss, against TRL 0.7.10's recipes.

Tolerances. The elementwise kinds and the PPO loss are the same torch ops as the transcriptions
they are checked against: equal to 1e-6. The fused full KL upcasts its inputs to fp32 exactly, as
the reference does, and differs only in summation order: 1e-5. Its gradients come back in the
input's dtype, rounded once from the same fp32 value: rtol = EPS[dtype] (1e-5 for fp32).
"""

import math
import warnings

import numpy as np
import pytest
import torch

from fastalign.kernels.kl import full_kl, full_kl_reference, kl_penalty, kl_penalty_reference
from fastalign.kernels.ppo import ppo_loss
from fastalign.kernels.rl import (
    AdaptiveKLController,
    FixedKLController,
    PerPromptStatTracker,
    RunningMoments,
    masked_mean,
    masked_var,
    masked_whiten,
)
from fastalign.kernels.shaping import compute_rewards, compute_rewards_packed
from helpers import DEVICE, EPS, assert_close

PATHS = ["torch", "triton"]


def _device(path):
    return DEVICE if path == "triton" else "cpu"


# ----------------------------------------------------------------------------------------------
# Masked statistics, controllers, running moments, per-prompt tracking.
# ----------------------------------------------------------------------------------------------


def test_masked_statistics_by_hand():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # Kept: 1, 2, 3, 6 -> mean 3, squared deviations 4, 1, 0, 9 -> population var 3.5, unbiased 14/3.
    assert masked_mean(values, mask).item() == 3.0
    assert masked_mean(values, mask, axis=1).tolist() == [1.5, 4.5]
    assert masked_var(values, mask).item() == pytest.approx(14 / 3)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(3.5)
    white = masked_whiten(values, mask)
    expected = (values - 3.0) / math.sqrt(14 / 3 + 1e-8)
    assert_close(white, expected, 1e-6, "whitened")
    assert_close(masked_whiten(values, mask, shift_mean=False), expected + 3.0, 1e-6, "whitened, mean kept")
    assert masked_mean(values.bfloat16(), mask).dtype == torch.float32  # statistics in fp32


def test_masked_statistics_bad_input():
    values = torch.randn(2, 3)
    with pytest.raises(ValueError, match="mask is empty"):
        masked_var(values, torch.zeros(2, 3))
    one = torch.zeros(2, 3)
    one[0, 1] = 1
    with pytest.raises(ValueError, match="one element"):
        masked_whiten(values, one)
    assert masked_var(values, one, unbiased=False).item() == 0.0
    with pytest.raises(ValueError, match=r"mask \(3,\) must match values \(2, 3\)"):
        masked_mean(values, torch.ones(3))


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 9: 9/6 - 1 = 0.5, clipped to 0.2; value = 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024.
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024, rel=1e-12)
    # KL 6.3 (a tensor, as computed in training): 0.05, inside the clip; value *= 1 + 0.05 * 100 / 10000.
    ctl.update(torch.tensor(6.3, dtype=torch.float64), n_steps=100)
    assert ctl.value == pytest.approx(0.201024 * 1.0005, rel=1e-12)
    # KL 0: -1 clipped to -0.2.
    ctl.update(0.0, n_steps=10000)
    assert ctl.value == pytest.approx(0.201024 * 1.0005 * 0.8, rel=1e-12)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target must be > 0"):
        AdaptiveKLController(0.2, 0.0, 10000)
    with pytest.raises(ValueError, match="horizon must be > 0"):
        AdaptiveKLController(0.2, 6.0, 0)


def test_running_moments_match_numpy():
    rm = RunningMoments()
    assert (rm.mean, rm.std) == (0.0, 1.0)
    seen = []
    rng = np.random.default_rng(0)
    for size, loc, scale in [(7, 1.0, 2.0), (1, 5.0, 1.0), (64, -3.0, 0.5), (13, 10.0, 4.0)]:
        xs = rng.normal(loc, scale, size).astype(np.float32)
        seen.append(xs)
        batch_mean, batch_std = rm.update(torch.from_numpy(xs))
        everything = np.concatenate(seen).astype(np.float64)
        assert batch_mean == pytest.approx(xs.astype(np.float64).mean(), rel=1e-6, abs=1e-9)
        if size > 1:
            assert batch_std == pytest.approx(xs.astype(np.float64).std(ddof=1), rel=1e-6)
        else:
            assert math.isnan(batch_std)
        assert rm.mean == pytest.approx(everything.mean(), rel=1e-9, abs=1e-12)
        assert rm.var == pytest.approx(everything.var(), rel=1e-9)
        assert rm.std == pytest.approx(everything.std(ddof=1), rel=1e-9)
        assert rm.count == pytest.approx(everything.size)
    with pytest.raises(ValueError, match="empty"):
        rm.update(torch.zeros(0))


def test_per_prompt_stat_tracker_by_hand():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    adv = tracker.update(["a", "b", "a"], [1.0, 2.0, 3.0])
    # "a": buffer [1, 3] holds min_count -> its own mean 2, std 1.
    # "b": buffer [2] is short -> the batch's mean 2 and std sqrt(2/3): (2 - 2) / ... = 0.
    np.testing.assert_allclose(adv, [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)], rtol=1e-12)
    # "a" again: buffer keeps the last 3 of [1, 3, 5, 7] -> [3, 5, 7], mean 5, std sqrt(8/3).
    adv = tracker.update(["a", "a"], torch.tensor([5.0, 7.0]))
    std = math.sqrt(8 / 3) + 1e-6
    np.testing.assert_allclose(adv, [0.0, 2 / std], rtol=1e-12, atol=1e-12)
    stats = tracker.get_stats()
    assert stats["a"]["count"] == 3 and stats["a"]["mean"] == pytest.approx(5.0)
    assert stats["b"] == {"mean": 2.0, "std": 0.0, "count": 1}
    with pytest.raises(ValueError, match="same length"):
        tracker.update(["a"], [1.0, 2.0])


# ----------------------------------------------------------------------------------------------
# KL penalties.
# ----------------------------------------------------------------------------------------------


def test_kl_penalty_kinds_by_hand():
    logprob = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-2.0, -1.0])  # d = +1, -1
    assert kl_penalty(logprob, ref, "kl").tolist() == [1.0, -1.0]
    assert kl_penalty(logprob, ref, "abs").tolist() == [1.0, 1.0]
    assert kl_penalty(logprob, ref, "mse").tolist() == [0.5, 0.5]
    # k3 = e^{-d} - 1 + d: e^{-1} = 0.36788 and e - 2 = 0.71828.
    assert_close(kl_penalty(logprob, ref, "k3"), torch.tensor([math.exp(-1), math.e - 2]), 1e-7, "k3")
    # Small d: e^{-d} - 1 + d ~ d^2/2, where e^{-d} - 1 and d cancel: still fp32-accurate.
    d = torch.tensor([1e-4, -3e-4])
    exact = torch.tensor([math.expm1(-x) + x for x in d.double().tolist()])
    assert_close(kl_penalty(d, torch.zeros(2), "k3"), exact, 1e-6, "k3, small d")


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "k3"])
def test_elementwise_kinds_match_reference_with_gradients(kind):
    logprob = (torch.randn(3, 11) - 2).requires_grad_()
    ref = (torch.randn(3, 11) - 2).requires_grad_()
    out = kl_penalty(logprob, ref, kind)
    exp = kl_penalty_reference(logprob, ref, kind)
    assert_close(out, exp, 1e-6, kind)
    g = torch.randn_like(out)
    assert_close(torch.autograd.grad(out, logprob, g)[0], torch.autograd.grad(exp, logprob, g)[0], 1e-6, "grad")


def test_unknown_kind_lists_the_kinds():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unknown KL penalty kind 'kl2'.*'kl', 'abs', 'mse', 'k3', 'full'"):
        kl_penalty(x, x, "kl2")
    with pytest.raises(ValueError, match="unknown KL penalty kind"):
        compute_rewards(torch.zeros(1), x[None], x[None], torch.ones(1, 3), 0.1, kl_penalty="KL")
    with pytest.raises(ValueError, match=r"logprob \(3,\) and ref_logprob \(2,\)"):
        kl_penalty(x, x[:2], "kl")


def _check_full(path, logits, ref_logits, needs=(True, True), **kw):
    x = logits.detach().clone().requires_grad_(needs[0])
    y = ref_logits.detach().clone().requires_grad_(needs[1])
    xr = logits.detach().clone().requires_grad_(needs[0])
    yr = ref_logits.detach().clone().requires_grad_(needs[1])
    out = kl_penalty(x, y, "full", backend=path, **kw) if not kw else full_kl(x, y, backend=path, **kw)
    ref = full_kl_reference(xr, yr)
    assert out.dtype == torch.float32 and out.shape == logits.shape[:-1]
    assert_close(out, ref, 1e-5, "full KL")
    g = torch.randn_like(ref)
    inputs = [t for t, n in zip((x, y), needs) if n]
    inputs_ref = [t for t, n in zip((xr, yr), needs) if n]
    grads = torch.autograd.grad(out, inputs, g)
    grads_ref = torch.autograd.grad(ref, inputs_ref, g)
    for name, a, b, t in zip(["logits", "ref_logits"], grads, grads_ref, inputs):
        assert a.dtype == t.dtype and a.shape == t.shape
        assert_close(a, b, max(EPS[t.dtype], 1e-5), f"grad {name}")
    return out


@pytest.mark.parametrize("lead,vocab", [((1,), 7), ((3, 5), 1037), ((2, 2, 3), 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_full_kl_matches_reference(path, dtype, lead, vocab):
    device = _device(path)
    logits = (torch.randn(*lead, vocab) * 3).to(device=device, dtype=dtype)
    ref_logits = (logits.float() + torch.randn(*lead, vocab, device=device)).to(dtype)
    out = _check_full(path, logits, ref_logits)
    assert (out > 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_full_kl_online_over_vocabulary_tiles(path):
    # V = 10007 spans three Triton tiles of 4096. Ramps move each row's maximum into a later tile,
    # so the running sums are re-referenced: rising policy and reference, rising reference only,
    # rising policy only, and plain noise.
    device = _device(path)
    vocab = 10007
    ramp = torch.linspace(0, 6, vocab)
    noise = torch.randn(8, vocab) * 2
    x = noise[:4] + torch.stack([ramp, 0 * ramp, ramp, 0 * ramp])
    y = noise[4:] + torch.stack([ramp, ramp, 0 * ramp, 0 * ramp])
    _check_full(path, x.to(device), y.to(device))


def test_full_kl_by_hand():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    logits = torch.zeros(2)
    ref_logits = torch.log(torch.tensor([1.0, 3.0]))
    for path in PATHS:
        out = full_kl(logits.to(_device(path)), ref_logits.to(_device(path)), backend=path)
        assert out.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_full_kl_odd_inputs(path):
    device = _device(path)
    # Logits near ±1e4 (nothing left for fp32 after subtracting a shared offset naively).
    spread = torch.where(torch.rand(2, 1037) < 0.5, -1e4, 1e4) + torch.randn(2, 1037)
    x = torch.cat([1e4 + torch.randn(2, 1037), spread]).to(device)
    y = torch.cat([1e4 + 2 * torch.randn(2, 1037), torch.randn(2, 1037)]).to(device)
    _check_full(path, x, y)
    # Strided rows (the usual [:, :-1] shift), several torch chunks, only the policy needing grad.
    full = torch.randn(2, 9, 515, device=device)
    _check_full(path, full[:, :-1], torch.randn(2, 8, 515, device=device), needs=(True, False), chunk_size=3)
    _check_full(path, full[:, 1:], full[:, :-1], needs=(False, True))
    # Identical rows: KL 0 and zero gradients.
    same = torch.randn(3, 1037, device=device)
    assert full_kl(same, same, backend=path).abs().max() < 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_full_kl_of_log_probs_equals_full_kl_of_logits(path):
    device = _device(path)
    x = torch.randn(4, 37, device=device, requires_grad=True)
    y = torch.randn(4, 37, device=device)
    # The penalty's value on rows of log-probs equals TRL's kl_div form, sum e^a (a - b).
    a, b = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    from_logprobs = full_kl(a, b, backend=path)
    trl = torch.nn.functional.kl_div(b, a, log_target=True, reduction="none").sum(-1)
    assert_close(from_logprobs, trl, 1e-5, "KL of log-probs")
    # And so are the gradients reaching the logits through the log_softmax.
    g = torch.randn(4, device=device)
    (grad_lp,) = torch.autograd.grad(from_logprobs, x, g)
    (grad_logits,) = torch.autograd.grad(full_kl(x, y, backend=path), x, g)
    assert_close(grad_lp, grad_logits, 1e-5, "grad through log_softmax")


def test_full_kl_bad_input():
    with pytest.raises(ValueError, match=r"same shape \[\.\.\., V\], got \(2, 7\) and \(2, 8\)"):
        full_kl(torch.randn(2, 7), torch.randn(2, 8))
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        full_kl(torch.randn(2, 7), torch.randn(2, 7), chunk_size=0)


# ----------------------------------------------------------------------------------------------
# Reward shaping, padded and packed.
# ----------------------------------------------------------------------------------------------


def _trl_compute_rewards(scores, logprobs, ref_logprobs, masks, kl_coef, kind):
    """TRL 0.7.10's loop over rows, transcribed (with the reference penalty)."""
    rewards, non_score_rewards, kls = [], [], []
    for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks):
        kl = kl_penalty_reference(logprob, ref_logprob, kind)
        kls.append(kl)
        non_score_reward = -kl_coef * kl
        non_score_rewards.append(non_score_reward)
        reward = non_score_reward.clone()
        last_non_masked_index = mask.nonzero()[-1]
        reward[last_non_masked_index] += score
        rewards.append(reward)
    return torch.stack(rewards), torch.stack(non_score_rewards), torch.stack(kls)


def _padded_masks():
    # Right padding, left padding, both, a hole before the last token, a full row, a single token.
    return torch.tensor([
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 0, 0],
    ]).float()


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "k3"])
def test_compute_rewards_matches_trl(kind):
    masks = _padded_masks()
    B, T = masks.shape
    logprobs, ref_logprobs, scores = torch.randn(B, T) - 2, torch.randn(B, T) - 2, torch.randn(B)
    out = compute_rewards(scores, logprobs, ref_logprobs, masks, 0.2, kl_penalty=kind)
    exp = _trl_compute_rewards(scores, logprobs, ref_logprobs, masks, 0.2, kind)
    for name, a, b in zip(["rewards", "non_score_rewards", "kls"], out, exp):
        assert a.shape == (B, T)
        assert_close(a, b, 1e-6, name)
    # Masked positions keep their penalty (TRL does not zero them).
    assert (out[1][masks == 0] != 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_compute_rewards_full_kl(path):
    device = _device(path)
    masks = _padded_masks().to(device)
    B, T = masks.shape
    logits, ref_logits = torch.randn(B, T, 29, device=device), torch.randn(B, T, 29, device=device)
    scores = torch.randn(B, device=device)
    out = compute_rewards(scores, logits, ref_logits, masks, 0.1, kl_penalty="full", backend=path)
    exp = _trl_compute_rewards(scores, logits, ref_logits, masks, 0.1, "full")
    for name, a, b in zip(["rewards", "non_score_rewards", "kls"], out, exp):
        assert_close(a, b, 1e-5, name)


def test_compute_rewards_by_hand():
    # One row, mask [0, 1, 1, 0]: the score lands on t = 2. kl = d = (0.5, -1, 2, 4), kl_coef 0.1.
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, 1.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0, -3.0]])
    rewards, non_score, kls = compute_rewards(torch.tensor([10.0]), logprobs, ref, torch.tensor([[0, 1, 1, 0]]), 0.1)
    assert kls.tolist() == [[0.5, -1.0, 2.0, 4.0]]
    assert_close(non_score, torch.tensor([[-0.05, 0.1, -0.2, -0.4]]), 1e-7, "non-score")
    assert_close(rewards, torch.tensor([[-0.05, 0.1, 9.8, -0.4]]), 1e-7, "rewards")


def test_compute_rewards_bad_input():
    masks = _padded_masks()
    B, T = masks.shape
    lp = torch.randn(B, T)
    masks[3] = 0
    with pytest.raises(ValueError, match=r"masks row\(s\) \[3\] have no position with mask 1"):
        compute_rewards(torch.randn(B), lp, lp, masks, 0.1)
    masks = _padded_masks()
    with pytest.raises(ValueError, match=r"scores \(5,\) must be one per row: \[6\]"):
        compute_rewards(torch.randn(B - 1), lp, lp, masks, 0.1)
    with pytest.raises(ValueError, match=r"ref_logprobs \(6, 6\) must match logprobs \(6, 7\)"):
        compute_rewards(torch.randn(B), lp, lp[:, 1:], masks, 0.1)
    with pytest.raises(ValueError, match=r"masks \(6, 7\) must match logprobs minus the vocabulary dim"):
        compute_rewards(torch.randn(B), lp, lp, masks, 0.1, kl_penalty="full")


def _pack(masks, *tensors):
    """Lay each row's tokens end to end, dropping leading padding (trailing padding and holes stay)."""
    keep = []
    lengths = []
    for row in masks:
        first = int(row.nonzero()[0])
        keep.append(torch.arange(first, row.numel()))
        lengths.append(row.numel() - first)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    packed = [torch.cat([t[b, idx] for b, idx in enumerate(keep)]) for t in (masks, *tensors)]
    return cu, keep, packed


@pytest.mark.parametrize("kind", ["kl", "k3", "full"])
def test_compute_rewards_packed_matches_padded(kind):
    masks = _padded_masks()
    B, T = masks.shape
    shape = (B, T, 13) if kind == "full" else (B, T)
    logprobs, ref_logprobs, scores = torch.randn(shape), torch.randn(shape), torch.randn(B)
    padded = compute_rewards(scores, logprobs, ref_logprobs, masks, 0.3, kl_penalty=kind)
    cu, keep, (mask_p, lp_p, ref_p) = _pack(masks, logprobs, ref_logprobs)
    packed = compute_rewards_packed(scores, lp_p, ref_p, mask_p, cu, 0.3, kl_penalty=kind)
    for name, a, b in zip(["rewards", "non_score_rewards", "kls"], packed, padded):
        expected = torch.cat([b[r, idx] for r, idx in enumerate(keep)])
        assert a.shape == mask_p.shape
        assert_close(a, expected, 1e-6, name)
    # The [1, N] form of a PackedBatch row gives the same, shaped [1, N].
    row = compute_rewards_packed(scores, lp_p[None], ref_p[None], mask_p[None], cu, 0.3, kl_penalty=kind)
    assert row[0].shape == (1, mask_p.numel()) and torch.equal(row[0][0], packed[0])


def test_compute_rewards_packed_bad_input():
    cu = torch.tensor([0, 3, 3, 6], dtype=torch.int32)
    lp, mask, scores = torch.randn(6), torch.tensor([1, 1, 0, 0, 1, 0]), torch.randn(3)
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] have no token with loss_mask 1"):
        compute_rewards_packed(scores, lp, lp, mask, cu, 0.1)
    mask[3] = 1
    cu_ok = torch.tensor([0, 3, 6], dtype=torch.int32)
    rewards, _, _ = compute_rewards_packed(scores[:2], lp, lp, mask, cu_ok, 0.1)
    assert rewards[1] == scores[0] and rewards[4] == scores[1]  # kl = 0 everywhere: only the scores
    with pytest.raises(ValueError, match=r"cu_seqlens must be \[S\+1\] = \[4\]"):
        compute_rewards_packed(scores, lp, lp, mask, cu_ok, 0.1)
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to N=6"):
        compute_rewards_packed(scores[:2], lp, lp, mask, torch.tensor([0, 3, 5]), 0.1)
    with pytest.raises(ValueError, match=r"must not decrease: cu_seqlens\[2\] < cu_seqlens\[1\]"):
        compute_rewards_packed(scores, lp, lp, mask, torch.tensor([0, 4, 2, 6]), 0.1)
    with pytest.raises(TypeError, match="integer"):
        compute_rewards_packed(scores[:2], lp, lp, mask, cu_ok.float(), 0.1)
    with pytest.raises(ValueError, match=r"loss_mask must be one packed row"):
        compute_rewards_packed(scores[:2], lp.view(2, 3), lp.view(2, 3), mask.view(2, 3), cu_ok, 0.1)


# ----------------------------------------------------------------------------------------------
# PPO loss.
# ----------------------------------------------------------------------------------------------


def _trl_loss(old_logprobs, values, vpreds, logprobs, mask, advantages, returns, cliprange, cliprange_value, vf_coef):
    """TRL 0.7.10's loss, transcribed (the ratio threshold aside)."""
    def mm(v, m):
        return (v * m).sum() / m.sum()

    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * mm(torch.max(vf_losses1, vf_losses2), mask)
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = mm(torch.max(pg_losses, pg_losses2), mask)
    stats = {
        "policy/clipfrac": mm(torch.gt(pg_losses2, pg_losses).float(), mask),
        "val/clipfrac": mm(torch.gt(vf_losses2, vf_losses1).float(), mask),
        "policy/approxkl": 0.5 * mm((logprobs - old_logprobs) ** 2, mask),
        "policy/policykl": mm(old_logprobs - logprobs, mask),
        "loss/total": pg_loss + vf_coef * vf_loss,
    }
    return pg_loss, vf_coef * vf_loss, stats


def _ppo_inputs(B=4, T=9):
    mask = _padded_masks()[:B, :T - 2]
    mask = torch.cat([mask, torch.ones(B, 2)], 1)
    old = torch.randn(B, T) * 0.1 - 2
    logprobs = (old + torch.randn(B, T) * 0.3).requires_grad_()  # ratios well outside 1 ± 0.2
    values = torch.randn(B, T)
    vpreds = (values + torch.randn(B, T) * 0.5).requires_grad_()  # some beyond values ± 0.2
    return dict(old_logprobs=old, values=values, vpreds=vpreds, logprobs=logprobs, mask=mask,
                advantages=torch.randn(B, T), returns=torch.randn(B, T))


def test_ppo_loss_matches_trl_with_gradients():
    x = _ppo_inputs()
    pg, vf, stats = ppo_loss(**x, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    pg_ref, vf_ref, stats_ref = _trl_loss(**x, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    assert_close(pg, pg_ref, 1e-6, "pg_loss")
    assert_close(vf, vf_ref, 1e-6, "vf_loss")
    for name, value in stats_ref.items():
        assert_close(stats[name], value, 1e-6, name)
    assert 0 < stats["policy/clipfrac"] < 1 and 0 < stats["val/clipfrac"] < 1  # both clips are exercised
    g_lp, g_v = torch.autograd.grad(pg + vf, [x["logprobs"], x["vpreds"]])
    r_lp, r_v = torch.autograd.grad(pg_ref + vf_ref, [x["logprobs"], x["vpreds"]])
    assert_close(g_lp, r_lp, 1e-6, "grad logprobs")
    assert_close(g_v, r_v, 1e-6, "grad vpreds")
    assert (g_lp[x["mask"] == 0] == 0).all() and (g_v[x["mask"] == 0] == 0).all()
    expected_keys = {
        "loss/policy", "loss/value", "loss/total", "policy/approxkl", "policy/policykl", "policy/clipfrac",
        "policy/advantages", "policy/advantages_mean", "policy/ratio", "returns/mean", "returns/var",
        "val/vpred", "val/error", "val/clipfrac", "val/mean", "val/var",
    }
    assert set(stats) == expected_keys and not any(v.requires_grad for v in stats.values())
    m = x["mask"].bool()
    assert stats["returns/var"].item() == pytest.approx(x["returns"][m].var().item(), rel=1e-5)
    assert stats["val/mean"].item() == pytest.approx(x["values"][m].mean().item(), rel=1e-5)


def test_ppo_loss_by_hand():
    # cliprange 0.2, cliprange_value 0.2, vf_coef 0.1; token 3 is masked out (its garbage must not count).
    # t1: ratio 1.5, A = 1: -1.5 vs -1.2 -> -1.2 (clipped).   t2: ratio 0.5, A = 2: -1.0 vs -1.6 -> -1.0.
    #     pg_loss = (-1.2 - 1.0) / 2 = -1.1, clipfrac 1/2.
    # t1: v = 0, v' = 1, R = 1.5: clipped v' = 0.2, losses 0.25 vs 1.69 -> 1.69 (clipped one wins).
    # t2: v = 0, v' = 0.1, R = 1: inside the clip, 0.81 both.  vf_loss = 0.5 (1.69 + 0.81) / 2 = 0.625.
    old = torch.zeros(1, 3)
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5), 5.0]], requires_grad=True)
    values = torch.zeros(1, 3)
    vpreds = torch.tensor([[1.0, 0.1, 9.0]], requires_grad=True)
    pg, vf, stats = ppo_loss(
        old, values, vpreds, logprobs, torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 2.0, 100.0]]),
        torch.tensor([[1.5, 1.0, -7.0]]), cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
        entropy=torch.tensor([[2.0, 4.0, 100.0]]),
    )
    assert pg.item() == pytest.approx(-1.1, rel=1e-6)
    assert vf.item() == pytest.approx(0.0625, rel=1e-6)
    assert stats["loss/value"].item() == pytest.approx(0.625, rel=1e-6)
    assert stats["loss/total"].item() == pytest.approx(-1.1 + 0.0625, rel=1e-6)
    assert stats["policy/clipfrac"].item() == 0.5 and stats["val/clipfrac"].item() == 0.5
    assert stats["policy/entropy"].item() == 3.0
    # approxkl = 0.5 * (ln^2 1.5 + ln^2 0.5) / 2; policykl = (-ln 1.5 - ln 0.5) / 2 = 0.5 ln(4/3).
    assert stats["policy/approxkl"].item() == pytest.approx(0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2), rel=1e-6)
    assert stats["policy/policykl"].item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # Gradients: t1 sits on both clips (zero); t2: d(-A r / 2)/dlp = -2 * 0.5 / 2 = -0.5 and
    # d(0.1 * 0.5 * (v' - R)^2 / 2)/dv' = 0.05 * (0.1 - 1) = -0.045; t3 masked: zero.
    g_lp, g_v = torch.autograd.grad(pg + vf, [logprobs, vpreds])
    assert_close(g_lp, torch.tensor([[0.0, -0.5, 0.0]]), 1e-6, "grad logprobs")
    assert_close(g_v, torch.tensor([[0.0, -0.045, 0.0]]), 1e-6, "grad vpreds")


def test_ppo_loss_ratio_threshold_skips_the_batch():
    x = _ppo_inputs()
    with torch.no_grad():
        x["logprobs"].copy_(x["old_logprobs"] + math.log(20.0))  # every ratio is 20
    with pytest.warns(UserWarning, match=r"average ratio of batch \(20\.00\) exceeds threshold 10\.00"):
        pg, vf, stats = ppo_loss(**x, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    assert pg.item() == 0.0 and vf.item() == 0.0 and stats["loss/total"].item() == 0.0
    assert pg.requires_grad and vf.requires_grad  # the graph is kept: backward still runs
    g_lp, g_v = torch.autograd.grad(pg + vf, [x["logprobs"], x["vpreds"]])
    assert (g_lp == 0).all() and (g_v == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pg, _, _ = ppo_loss(**x, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, ratio_threshold=25.0)
    assert pg.item() != 0.0


def test_ppo_loss_bad_input():
    x = _ppo_inputs()
    with pytest.raises(ValueError, match=r"vpreds \(4, 8\) must match mask \(4, 9\)"):
        ppo_loss(**{**x, "vpreds": x["vpreds"][:, 1:]}, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    with pytest.raises(ValueError, match=r"entropy \(4,\) must match mask"):
        ppo_loss(**x, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy=torch.ones(4))
    with pytest.raises(ValueError, match="mask is empty"):
        ppo_loss(**{**x, "mask": torch.zeros(4, 9)}, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    one = torch.zeros(4, 9)
    one[2, 5] = 1  # a single token: the loss is defined, the variances are NaN
    _, _, stats = ppo_loss(**{**x, "mask": one}, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    assert math.isnan(stats["returns/var"].item()) and math.isfinite(stats["loss/total"].item())
    assert "policy/entropy" not in stats

