"""DDIM step log-probabilities against diffusers' own DDIMScheduler, and the DDPO loss by hand."""

import math

import pytest
import torch

from fastalign.kernels.ddpo import ddim_step_with_logprob, ddpo_loss

diffusers = pytest.importorskip("diffusers", reason="DDPO needs diffusers (pip install fastalign[diffusion])")


def _scheduler(prediction_type="epsilon", steps=10):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_step_matches_diffusers_and_the_gaussian_density(prediction_type):
    scheduler = _scheduler(prediction_type)
    x, out, z = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    eta = 0.8
    for t in scheduler.timesteps[:-1]:  # every step but the last, where the clamp differs (below)
        expected_prev = scheduler.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        prev, log_prob = ddim_step_with_logprob(scheduler, out, t, x, eta=eta, prev_sample=expected_prev)
        assert torch.equal(prev, expected_prev)
        sigma = eta * scheduler._get_variance(t, t - 1000 // 10).sqrt()
        # log N(mean + sigma z; mean, sigma^2) = -z^2 / 2 - log sigma - log sqrt(2 pi), averaged
        want = (-(z**2) / 2 - sigma.log() - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, want, rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_consistent_with_its_log_prob():
    scheduler = _scheduler()
    x, out = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = scheduler.timesteps[2]
    a, lp_a = ddim_step_with_logprob(scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
    b, lp_b = ddim_step_with_logprob(scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(lp_a, lp_b)
    _, lp_given = ddim_step_with_logprob(scheduler, out, t, x, eta=1.0, prev_sample=a)
    torch.testing.assert_close(lp_given, lp_a)
    # A per-sample timestep tensor works too, and the log-prob has a gradient w.r.t. the model output.
    out.requires_grad_()
    _, lp = ddim_step_with_logprob(scheduler, out, torch.full((2,), int(t)), x, eta=1.0, prev_sample=a)
    (grad,) = torch.autograd.grad(lp.sum(), out)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_last_step_uses_the_first_alpha():
    # t_prev is clamped to 0 at the last step, so a_p = alphas_cumprod[0] (TRL 0.7.10's convention).
    # Stable Diffusion's schedulers use steps_offset=1: the last step is t=1, from which t_prev=0.
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    scheduler.set_timesteps(10)
    x, out, prev = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    t = scheduler.timesteps[-1]
    _, lp = ddim_step_with_logprob(scheduler, out, t, x, eta=1.0, prev_sample=prev)
    a_t, a_p = scheduler.alphas_cumprod[int(t)], scheduler.alphas_cumprod[0]
    x0 = (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
    sigma = ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    mean = a_p.sqrt() * x0 + (1 - a_p - sigma**2).sqrt() * out
    want = torch.distributions.Normal(mean, sigma).log_prob(prev).mean()
    torch.testing.assert_close(lp[0], want, rtol=1e-5, atol=1e-5)


def test_step_errors():
    scheduler = diffusers.DDIMScheduler()
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(scheduler, x, 10, x, eta=1.0)
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(scheduler, x, 10, x, eta=0.0)
    with pytest.raises(ValueError, match="not both"):
        ddim_step_with_logprob(scheduler, x, 10, x, eta=1.0, prev_sample=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="zero variance"):
        ddim_step_with_logprob(scheduler, x, 0, x, eta=1.0)  # t=0 clamps onto itself


def test_ddpo_loss_by_hand():
    # A = [2, -1], ratio = [1.5, 0.5], clip 0.2:
    #   pair 1: max(-2 * 1.5, -2 * 1.2) = -2.4;  pair 2: max(1 * 0.5, 1 * 0.8) = 0.8;  mean -0.8
    loss = ddpo_loss(torch.tensor([2.0, -1.0]), torch.tensor([1.5, 0.5]), clip_range=0.2, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-0.8)
    # Advantages clipped to +-3 first: A = 10 -> 3, ratio 1.0: -3.
    assert ddpo_loss(torch.tensor([10.0]), torch.tensor([1.0]), 0.2, 3.0).item() == pytest.approx(-3.0)
    ratio = torch.tensor([1.1, 0.7, 1.3], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda r: ddpo_loss(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), r, 0.2, 5.0), (ratio,))
    with pytest.raises(ValueError, match="must match ratio"):
        ddpo_loss(torch.zeros(2), torch.zeros(3), 0.2, 5.0)
