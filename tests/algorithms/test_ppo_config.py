"""PPOConfig: TRL 0.7.10's names and defaults, and clear errors for inconsistent batching."""

import pytest

from fastalign.algorithms.ppo import PPOConfig


def test_defaults_follow_trl():
    c = PPOConfig()
    assert (c.learning_rate, c.init_kl_coef, c.target, c.horizon, c.gamma, c.lam) == (1e-5, 0.2, 6.0, 10000.0, 1.0, 0.95)
    assert (c.cliprange, c.cliprange_value, c.vf_coef, c.batch_size, c.mini_batch_size, c.ppo_epochs) == (
        0.2, 0.2, 0.1, 256, 1, 4)
    assert c.adap_kl_ctrl and c.kl_penalty == "kl" and not c.early_stopping and c.target_kl == 1.0
    assert c.ratio_threshold == 10.0 and c.max_grad_norm is None and c.total_ppo_epochs == 79


def test_batch_size_must_split_into_backward_batches():
    assert PPOConfig(batch_size=12, mini_batch_size=3, gradient_accumulation_steps=2).backward_batch_size == 6
    with pytest.raises(ValueError, match=r"batch_size \(10\) must be a multiple of mini_batch_size x"):
        PPOConfig(batch_size=10, mini_batch_size=3)


@pytest.mark.parametrize("kw, name", [({"kl_penalty": "kl2"}, "kl_penalty"), ({"lam": 1.5}, "lam"),
                                      ({"cliprange": 0}, "cliprange"), ({"ppo_epochs": 0}, "ppo_epochs")])
def test_bad_values_are_named(kw, name):
    with pytest.raises(ValueError, match=name):
        PPOConfig(**kw)
