"""The packed PPO step equals a padded, TRL 0.7.10-style step (tests/ppo_padded.py, plain torch,
checked against TRL 0.7.10 itself when it was written): per-token log-probs, values, KL, rewards,
advantages and returns, the logged statistics, and the weights after the step, in fp32."""

import copy

import pytest
import torch
from ppo_padded import padded_ppo_step

from fastalign.algorithms import PPOConfig, PPOTrainer
from fastalign.models import CausalLMWithValueHead
from fastalign.models.tiny import char_tokenizer, tiny_model

STATS = ["objective/kl", "objective/entropy", "ppo/mean_non_score_reward", "ppo/mean_scores", "ppo/loss/policy",
         "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/approxkl", "ppo/policy/policykl",
         "ppo/policy/clipfrac", "ppo/policy/advantages_mean", "ppo/returns/mean", "ppo/val/vpred", "ppo/val/error",
         "ppo/val/clipfrac", "ppo/val/mean"]

CASES = {
    "kl": {},
    "abs": dict(kl_penalty="abs"),
    "mse": dict(kl_penalty="mse", gamma=0.9, lam=0.8),
    "full": dict(kl_penalty="full"),
    "accumulation": dict(mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=3),
    "clips": dict(cliprange=0.05, cliprange_value=0.05, vf_coef=0.5),
    "whiten-masks": dict(whiten_rewards=True, masks=True),
    "early-stop": dict(early_stopping=True, target_kl=1e-6, ppo_epochs=3),
    "grad-norm": dict(max_grad_norm=0.05),
}


def samples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = [torch.randint(4, 100, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(4, 100, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g) for _ in range(n)]
    return queries, responses, torch.randn(n, generator=g)


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_step_equals_padded_step(case, tmp_path):
    options = dict(CASES[case])
    masks = options.pop("masks", False)
    options = {"mini_batch_size": 4, "ppo_epochs": 2, **options}
    config = PPOConfig(batch_size=8, output_dir=str(tmp_path), disable_tqdm=True, seed=3, adap_kl_ctrl=False,
                       init_kl_coef=0.3, max_tokens_per_batch=32, **options)
    lm = tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=1)
    policy = CausalLMWithValueHead(lm, summary_dropout_prob=0.0)
    with torch.no_grad():  # a policy away from its reference, so every KL term is non-zero
        ref = copy.deepcopy(lm).eval()
        for p in lm.parameters():
            p.add_(0.03 * torch.randn_like(p))
    padded_policy, padded_ref = copy.deepcopy(policy), copy.deepcopy(ref)
    trainer = PPOTrainer(config, policy, ref_model=ref, tokenizer=char_tokenizer(),
                         optimizer=torch.optim.SGD(policy.parameters(), lr=0.1))
    q, r, s = samples()
    response_masks = None
    if masks:
        response_masks = [torch.ones_like(x) for x in r]
        for m in response_masks:
            if len(m) > 2:
                m[1] = 0
    g = torch.Generator().manual_seed(config.seed)  # the trainer's shuffles, drawn alike
    perms = [torch.randperm(8, generator=g).tolist() for _ in range(config.ppo_epochs)]
    want = padded_ppo_step(
        padded_policy, padded_ref, torch.optim.SGD(padded_policy.parameters(), lr=0.1), q, r, s, kl_coef=0.3,
        permutations=perms, kl_penalty=config.kl_penalty, gamma=config.gamma, lam=config.lam,
        cliprange=config.cliprange, cliprange_value=config.cliprange_value, vf_coef=config.vf_coef,
        whiten_rewards=config.whiten_rewards, mini_batch_size=config.mini_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, ppo_epochs=config.ppo_epochs,
        early_stopping=config.early_stopping, target_kl=config.target_kl, ratio_threshold=config.ratio_threshold,
        max_grad_norm=config.max_grad_norm, response_masks=response_masks, pad_token_id=0,
    )
    got = trainer.step(q, r, s, response_masks=response_masks)
    ro = trainer.last_rollout

    for name, flat in (("logprobs", ro.logprobs), ("ref_logprobs", ro.ref_logprobs), ("values", ro.values),
                       ("kls", ro.kls), ("non_score_rewards", ro.non_score_rewards), ("advantages", ro.advantages),
                       ("returns", ro.returns), ("masks", ro.mask)):
        torch.testing.assert_close(flat, torch.cat(want[name]).float(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert got["ppo/epochs"] == want["epochs_run"] == (1 if case == "early-stop" else config.ppo_epochs)
    if case == "clips":
        assert got["ppo/policy/clipfrac"] > 0 and got["ppo/val/clipfrac"] > 0
    for key in STATS:
        assert got[key] == pytest.approx(float(want[key]), rel=1e-4, abs=1e-6), key
    for (name, a), b in zip(policy.named_parameters(), padded_policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} after the step: {m}")
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), copy.deepcopy(ref).parameters()))
