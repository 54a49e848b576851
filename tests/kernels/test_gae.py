"""GAE: every path of the scan against the per-step loop, and compute_advantages against TRL's recipe.

Tolerances. Each path computes the same fp32 TD residuals as the loop, in the same order of
operations; only the scan's summation order differs (a tree within Triton tiles, an L-term dot
product per step on the torch path). An advantage is a sum of up to 1/(1 - gamma*lam) residuals of
the scale of the inputs, so 1e-5 against the tensor's largest entry is a few hundred fp32 roundings.
"""

import pytest
import torch

from fastalign.kernels import gae as gae_module
from fastalign.kernels.gae import compute_advantages, gae, gae_reference
from fastalign.kernels.rl import masked_whiten
from helpers import DEVICE, assert_close

PATHS = ["torch", "triton"]
GAMMA, LAM = 0.99, 0.95


def _device(path):
    return DEVICE if path == "triton" else "cpu"


def _mask(B, T, seed=0):
    """Left padding, right padding and holes: row b has a different mix of each."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.15).float()  # holes
    for b in range(B):
        left = int(torch.randint(0, max(1, T // 3), (1,), generator=g)) if b % 3 != 2 else 0
        right = int(torch.randint(0, max(1, T // 4), (1,), generator=g)) if b % 3 != 0 else 0
        mask[b, :left] = 0
        mask[b, T - right:] = 0
        mask[b, min(left, T - 1)] = 1  # every row keeps at least one position
    return mask


def _trl_compute_advantages(values, rewards, mask, gamma, lam, whiten_rewards):
    """TRL 0.7.10's recipe, transcribed literally (loop included) as an independent check."""
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values
    advantages = masked_whiten(advantages, mask)
    return values, advantages.detach(), returns


# (B, T): one step; one row; rows not a multiple of the row block; T not a multiple of the
# Triton tile (256) nor of the torch block (128); several tiles.
SHAPES = [(1, 1), (1, 7), (3, 5), (257, 5), (4, 300), (2, 1000)]


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("path", PATHS)
def test_gae_matches_loop(path, B, T):
    device = _device(path)
    values, rewards = torch.randn(B, T) * 2, torch.randn(B, T)
    mask = _mask(B, T)
    ref = gae_reference(values, rewards, mask, GAMMA, LAM)
    out = gae(values.to(device), rewards.to(device), mask.to(device), GAMMA, LAM, backend=path)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    assert_close(out, ref, 1e-5, "advantages")
    # Without a mask the recursion sees the raw values and rewards.
    out = gae(values.to(device), rewards.to(device), None, GAMMA, LAM, backend=path)
    assert_close(out, gae_reference(values, rewards, None, GAMMA, LAM), 1e-5, "advantages, no mask")


@pytest.mark.parametrize("path", PATHS + ["reference"])
def test_gae_three_steps_by_hand(path):
    device = _device(path)
    # gamma = 0.5, lam = 0.5 (c = 0.25), one row, mask [0, 1, 1]: left padding at t = 0.
    #   masked v = [0, 2, 4],  r = [0, 1, 3]
    #   delta_2 = 3 + 0.5*0 - 4 = -1                     A_2 = -1
    #   delta_1 = 1 + 0.5*4 - 2 =  1                     A_1 = 1 + 0.25*(-1)   = 0.75
    #   delta_0 = 0 + 0.5*2 - 0 =  1  (padding, v_1 leaks in)  A_0 = 1 + 0.25*0.75 = 1.1875
    values = torch.tensor([[7.0, 2.0, 4.0]], device=device)
    rewards = torch.tensor([[5.0, 1.0, 3.0]], device=device)
    mask = torch.tensor([[0.0, 1.0, 1.0]], device=device)
    out = gae(values, rewards, mask, 0.5, 0.5, backend=path)
    assert out.cpu().tolist() == [[1.1875, 0.75, -1.0]]
    # c = 0: each advantage is its own residual; gamma = 0: the residual is r - v.
    assert gae(values, rewards, mask, 0.5, 0.0, backend=path).cpu().tolist() == [[1.0, 1.0, -1.0]]
    assert gae(values, rewards, mask, 0.0, 0.9, backend=path).cpu().tolist() == [[0.0, -1.0, -1.0]]


@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("path", PATHS + ["reference"])
def test_compute_advantages_matches_trl(path, whiten_rewards):
    device = _device(path)
    B, T = 5, 300
    values, rewards, mask = torch.randn(B, T), torch.randn(B, T), _mask(B, T, seed=1)
    exp_v, exp_a, exp_r = _trl_compute_advantages(values, rewards, mask, GAMMA, LAM, whiten_rewards)
    v, a, r = compute_advantages(
        values.to(device), rewards.to(device), mask.to(device), GAMMA, LAM, whiten_rewards, backend=path
    )
    assert_close(v, exp_v, 0, "values")
    assert_close(r, exp_r, 1e-5, "returns")
    assert_close(a, exp_a, 1e-5, "whitened advantages")
    m = mask.bool()
    assert abs(a.cpu()[m].mean().item()) < 1e-5 and a.cpu()[m].std().item() == pytest.approx(1.0, rel=1e-4)


def test_reward_whitening_changes_masked_positions_too():
    # After whitening with shift_mean=False the masked rewards are mean*(1 - 1/std), not 0; the
    # scan must use them as they are, so unmasking them again would change the advantages.
    values, rewards, mask = torch.randn(3, 40), torch.randn(3, 40) * 3 + 1, _mask(3, 40, seed=2)
    _, a, r = compute_advantages(values, rewards, mask, GAMMA, LAM, whiten_rewards=True)
    _, exp_a, exp_r = _trl_compute_advantages(values, rewards, mask, GAMMA, LAM, True)
    assert_close(r, exp_r, 1e-5, "returns")
    _, a_plain, _ = compute_advantages(values, rewards, mask, GAMMA, LAM, whiten_rewards=False)
    assert (a - a_plain).abs().max() > 1e-3


def test_torch_path_is_stable_on_long_rows():
    # T = 4096 with gamma * lam = 0.9: a c^{-t} rescaling would overflow fp32 here.
    B, T = 2, 4096
    values, rewards = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    exact = torch.zeros(B, T, dtype=torch.float64)
    acc = torch.zeros(B, dtype=torch.float64)
    for t in reversed(range(T)):
        nxt = values[:, t + 1] if t < T - 1 else 0.0
        acc = rewards[:, t] + 1.0 * nxt - values[:, t] + 0.9 * acc
        exact[:, t] = acc
    out = gae(values.float(), rewards.float(), None, 1.0, 0.9, backend="torch")
    assert torch.isfinite(out).all()
    assert_close(out, exact, 1e-5, "advantages vs float64 loop")


def test_torch_path_recursion_over_block_levels(monkeypatch):
    # Blocks of 4 steps: T = 100 takes three levels of block heads (100 -> 25 -> 7 -> 2).
    monkeypatch.setattr(gae_module, "TORCH_BLOCK", 4)
    values, rewards, mask = torch.randn(3, 100), torch.randn(3, 100), _mask(3, 100, seed=3)
    out = gae(values, rewards, mask, GAMMA, LAM, backend="torch")
    assert_close(out, gae_reference(values, rewards, mask, GAMMA, LAM), 1e-5, "advantages")


@pytest.mark.parametrize("path", PATHS)
def test_gae_low_precision_strided_and_bool_mask(path):
    device = _device(path)
    full = torch.randn(4, 65, device=device).to(torch.bfloat16)
    values = full[:, :-1]  # not contiguous
    rewards = torch.randn(4, 64, device=device).to(torch.bfloat16)
    mask = _mask(4, 64, seed=4).bool().to(device)
    out = gae(values, rewards, mask, GAMMA, LAM, backend=path)
    ref = gae_reference(values.float().cpu(), rewards.float().cpu(), mask.float().cpu(), GAMMA, LAM)
    assert out.dtype == torch.float32
    assert_close(out, ref, 1e-5, "advantages")


@pytest.mark.parametrize("path", PATHS)
def test_no_gradients(path):
    device = _device(path)
    values = torch.randn(2, 6, device=device, requires_grad=True)
    rewards = torch.randn(2, 6, device=device, requires_grad=True)
    mask = torch.ones(2, 6, device=device)
    assert not gae(values, rewards, mask, GAMMA, LAM, backend=path).requires_grad
    assert not any(t.requires_grad for t in compute_advantages(values, rewards, mask, GAMMA, LAM, backend=path))


def test_bad_input():
    v, r, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"rewards \(2, 4\) must match values \(2, 5\)"):
        gae(v, r[:, :4], m, GAMMA, LAM)
    with pytest.raises(ValueError, match=r"mask \(2, 4\) must match values"):
        compute_advantages(v, r, m[:, :4], GAMMA, LAM)
    with pytest.raises(ValueError, match=r"values must be \[B, T\]"):
        gae(v[0], r[0], m[0], GAMMA, LAM)
    with pytest.raises(ValueError, match="mask is empty"):
        compute_advantages(v, r, torch.zeros(2, 5), GAMMA, LAM)
    one = torch.zeros(2, 5)
    one[1, 3] = 1
    with pytest.raises(ValueError, match="one element"):
        compute_advantages(v, r, one, GAMMA, LAM)
    with pytest.raises(ValueError, match="backend='fast'"):
        gae(v, r, m, GAMMA, LAM, backend="fast")
