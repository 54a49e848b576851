"""Sanity checks of the padded TRL-0.7.10 PPO oracle (tests/ppo_padded.py) on its own, before it is
trusted as the reference for fastalign's packed PPOTrainer."""

import copy
import statistics

import pytest
import torch
from ppo_padded import compute_advantages, masked_var, masked_whiten, padded_ppo_step
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 20


def tiny_lm(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


class ValueHeadLM(torch.nn.Module):
    """Causal LM + a linear value head on the last hidden state: (logits, None, values)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.v_head = torch.nn.Linear(lm.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, None, self.v_head(out.hidden_states[-1]).squeeze(-1)


def make_models(seed=1, ref_seed=2):
    policy = ValueHeadLM(tiny_lm(seed))
    ref = tiny_lm(ref_seed)
    return policy, ref


def rand_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = [torch.randint(1, VOCAB, (lq,), generator=g) for lq, _ in lengths]
    rs = [torch.randint(1, VOCAB, (lr,), generator=g) for _, lr in lengths]
    return qs, rs


def sampled_batch(policy, n, q_len, r_len, seed):
    """Responses sampled from the policy itself, so that the policy KL estimate is a real KL."""
    g = torch.Generator().manual_seed(seed)
    qs, rs = [], []
    with torch.no_grad():
        for _ in range(n):
            ids = torch.randint(1, VOCAB, (q_len,), generator=g)
            q = ids.clone()
            for _ in range(r_len):
                logits = policy.lm(input_ids=ids[None]).logits[0, -1]
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
                ids = torch.cat([ids, nxt])
            qs.append(q)
            rs.append(ids[q_len:])
    return qs, rs


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def identity_perms(bs, epochs):
    return [list(range(bs)) for _ in range(epochs)]


# ----------------------------------------------------------------------------------------------


def test_gae_matches_a_hand_computed_three_step_example():
    gamma, lam = 0.9, 0.8
    # three real steps and one padded position whose (garbage) value and reward must not matter
    values = torch.tensor([[0.5, 1.0, -0.5, 7.0]])
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    masked_values, adv, ret = compute_advantages(values, rewards, mask, gamma=gamma, lam=lam)

    # by hand: delta_t = r_t + gamma v_{t+1} - v_t, A_t = delta_t + gamma lam A_{t+1}
    # t=2: delta = 2 + 0.9*0 - (-0.5) = 2.5                   A2 = 2.5
    # t=1: delta = 0 + 0.9*(-0.5) - 1 = -1.45                  A1 = -1.45 + 0.72*2.5  = 0.35
    # t=0: delta = 1 + 0.9*1 - 0.5 = 1.4                       A0 = 1.4  + 0.72*0.35 = 1.652
    raw = [1.652, 0.35, 2.5]
    torch.testing.assert_close(ret[0, :3], torch.tensor([1.652 + 0.5, 0.35 + 1.0, 2.5 - 0.5]))
    torch.testing.assert_close(masked_values, torch.tensor([[0.5, 1.0, -0.5, 0.0]]))
    mean, var = statistics.fmean(raw), statistics.variance(raw)  # variance: unbiased, n-1
    expected = torch.tensor([(a - mean) / (var + 1e-8) ** 0.5 for a in raw])
    torch.testing.assert_close(adv[0, :3], expected)
    assert abs(adv[0, :3].mean().item()) < 1e-6


def test_masked_statistics():
    x = torch.tensor([1.0, 2.0, 4.0, 100.0])
    m = torch.tensor([1, 1, 1, 0])
    assert masked_var(x, m).item() == pytest.approx(statistics.variance([1.0, 2.0, 4.0]))
    w = masked_whiten(x, m, shift_mean=False)
    assert (w * m).sum().item() / 3 == pytest.approx(7 / 3)  # mean kept when shift_mean=False


def test_whitened_rewards_do_not_depend_on_padding():
    values = torch.tensor([[0.3, -0.2, 0.8, 0.1]])
    rewards = torch.tensor([[0.0, -0.1, 0.2, 1.5]])
    mask = torch.ones(1, 4, dtype=torch.long)

    def pad(t, v):
        return torch.cat([t, torch.full((1, 3), v, dtype=t.dtype)], dim=1)

    kw = {"gamma": 0.95, "lam": 0.9, "whiten_rewards": True}
    _, a, r = compute_advantages(values, rewards, mask, **kw)
    _, ap, rp = compute_advantages(pad(values, 9.0), pad(rewards, -3.0), pad(mask, 0), **kw)
    torch.testing.assert_close(ap[:, :4], a)
    torch.testing.assert_close(rp[:, :4], r)


def test_logprobs_values_and_masks_align_with_unpadded_forwards():
    policy, ref = make_models()
    qs, rs = rand_batch([(3, 4), (5, 2), (2, 6)])
    scores = torch.tensor([0.5, -1.0, 2.0])
    rmasks = [torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1]), torch.tensor([1, 1, 1, 1, 0, 0])]
    kl_coef = 0.3
    out = padded_ppo_step(policy, ref, torch.optim.SGD(policy.parameters(), lr=0.0), qs, rs, scores,
                          kl_coef=kl_coef, permutations=[], ppo_epochs=0, mini_batch_size=2,
                          response_masks=rmasks, pad_token_id=0)
    assert out["epochs_run"] == 0
    for i, (q, r) in enumerate(zip(qs, rs)):
        ids = torch.cat([q, r])[None]
        with torch.no_grad():
            logits, _, vals = policy(ids, torch.ones_like(ids))
            ref_logits = ref(input_ids=ids).logits
        s = len(q) - 1
        lp = torch.log_softmax(logits[0, s:s + len(r)], -1).gather(-1, r[:, None])[:, 0]
        ref_lp = torch.log_softmax(ref_logits[0, s:s + len(r)], -1).gather(-1, r[:, None])[:, 0]
        m = rmasks[i].float()
        torch.testing.assert_close(out["logprobs"][i], lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["ref_logprobs"][i], ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["values"][i], vals[0, s:s + len(r)] * m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["masks"][i], m)
        kl = lp - ref_lp
        torch.testing.assert_close(out["kls"][i], kl, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["non_score_rewards"][i], -kl_coef * kl, atol=1e-5, rtol=1e-5)
        last = int(m.nonzero()[-1])
        expected = -kl_coef * kl
        expected[last] += scores[i]
        torch.testing.assert_close(out["rewards"][i], expected, atol=1e-5, rtol=1e-5)
    # rollout statistics over the masked tokens
    kl_sums = [(out["kls"][i] * out["masks"][i]).sum() for i in range(3)]
    assert out["objective/kl"] == pytest.approx(torch.stack(kl_sums).mean().item(), abs=1e-5)
    assert out["ppo/mean_scores"] == pytest.approx(scores.mean().item())
    assert out["ppo/std_scores"] == pytest.approx(scores.std().item())


def test_kl_penalty_variants():
    policy, ref = make_models()
    qs, rs = rand_batch([(3, 4), (4, 3)], seed=5)
    scores = torch.tensor([1.0, -1.0])
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    kls = {}
    for kind in ("kl", "abs", "mse", "full"):
        out = padded_ppo_step(policy, ref, opt, qs, rs, scores, kl_coef=0.1, permutations=[],
                              ppo_epochs=0, kl_penalty=kind, mini_batch_size=2)
        kls[kind] = torch.cat(out["kls"])
    torch.testing.assert_close(kls["abs"], kls["kl"].abs())
    torch.testing.assert_close(kls["mse"], 0.5 * kls["kl"] ** 2)
    assert (kls["full"] >= -1e-6).all() and kls["full"].max() > 1e-4
    # against a reference identical to the policy's LM every estimate vanishes
    out = padded_ppo_step(policy, copy.deepcopy(policy.lm), opt, qs, rs, scores, kl_coef=0.1,
                          permutations=[], ppo_epochs=0, kl_penalty="full", mini_batch_size=2)
    assert torch.cat(out["kls"]).abs().max() < 1e-6


def test_optimizer_changes_weights_and_stats_are_finite():
    policy, ref = make_models()
    qs, rs = rand_batch([(3, 4), (5, 2), (2, 6), (4, 4)], seed=3)
    before = params(policy)
    timings = {}
    out = padded_ppo_step(policy, ref, torch.optim.SGD(policy.parameters(), lr=0.5), qs, rs,
                          torch.tensor([1.0, -0.5, 0.2, 2.0]), kl_coef=0.05,
                          permutations=[[3, 1, 0, 2], [0, 2, 1, 3]], ppo_epochs=2, mini_batch_size=2,
                          timings=timings)
    assert any(not torch.equal(a, b) for a, b in zip(before, params(policy)))
    assert out["epochs_run"] == 2
    for key in ("loss/policy", "loss/value", "loss/total", "policy/entropy", "policy/approxkl",
                "policy/policykl", "policy/clipfrac", "policy/advantages_mean", "returns/mean",
                "returns/var", "val/vpred", "val/error", "val/clipfrac", "val/mean", "val/var",
                "val/var_explained"):
        assert torch.isfinite(torch.tensor(out[f"ppo/{key}"])), key
    assert out["ppo/val/var_explained"] == pytest.approx(
        1 - out["ppo/val/error"] / out["ppo/returns/var"])
    assert set(timings) == {"forward_pass", "compute_rewards", "compute_advantages", "optimize_step"}


def test_ratio_threshold_zeroes_the_update():
    policy, ref = make_models()
    qs, rs = rand_batch([(3, 4), (5, 2)], seed=4)
    before = params(policy)
    with pytest.warns(UserWarning, match="ratio"):
        out = padded_ppo_step(policy, ref, torch.optim.SGD(policy.parameters(), lr=0.5), qs, rs,
                              torch.tensor([1.0, -1.0]), kl_coef=0.05, permutations=identity_perms(2, 1),
                              ppo_epochs=1, mini_batch_size=2, ratio_threshold=0.0)
    assert out["ppo/loss/total"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, params(policy)))


def test_early_stopping_breaks_after_the_first_epoch():
    torch.manual_seed(0)
    init, ref = make_models()
    qs, rs = sampled_batch(init, n=4, q_len=3, r_len=5, seed=7)
    scores = torch.tensor([1.0, -1.0, 0.5, -0.5])
    perms = [[2, 0, 3, 1], [1, 3, 0, 2], [0, 1, 2, 3], [3, 2, 1, 0]]

    def run(**kw):
        policy = copy.deepcopy(init)
        out = padded_ppo_step(policy, ref, torch.optim.SGD(policy.parameters(), lr=1.0), qs, rs, scores,
                              kl_coef=0.05, permutations=perms, mini_batch_size=1, **kw)
        return out, params(policy)

    stopped, w_stopped = run(ppo_epochs=4, early_stopping=True, target_kl=1e-9)
    one, w_one = run(ppo_epochs=1)
    full, _ = run(ppo_epochs=4, early_stopping=False, target_kl=1e-9)
    assert stopped["epochs_run"] == 1
    assert full["epochs_run"] == 4
    # stopping comes after the epoch's updates: the weights are those of a single-epoch step
    for a, b in zip(w_stopped, w_one):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert stopped["ppo/policy/policykl"] == pytest.approx(one["ppo/policy/policykl"])


def test_gradient_accumulation_equals_one_big_minibatch():
    # equal lengths: every mini-batch holds as many masked tokens, so averaging two mini-batch
    # means equals the mean over their union
    init, ref = make_models()
    qs, rs = rand_batch([(3, 4)] * 4, seed=9)
    scores = torch.tensor([1.0, -1.0, 0.3, 0.7])

    def run(mb, gas):
        policy = copy.deepcopy(init)
        opt = torch.optim.SGD(policy.parameters(), lr=0.5)
        calls = []
        step = opt.step
        opt.step = lambda *a, **k: (calls.append(1), step(*a, **k))[1]
        padded_ppo_step(policy, ref, opt, qs, rs, scores, kl_coef=0.05, permutations=[[2, 0, 3, 1]],
                        ppo_epochs=1, mini_batch_size=mb, gradient_accumulation_steps=gas)
        return params(policy), len(calls)

    w_big, n_big = run(4, 1)
    w_acc, n_acc = run(2, 2)
    _, n_small = run(2, 1)
    assert (n_big, n_acc, n_small) == (1, 1, 2)
    for a, b in zip(w_big, w_acc):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_max_grad_norm_clips_the_update():
    init, ref = make_models()
    qs, rs = rand_batch([(3, 4), (4, 3)], seed=11)
    policy = copy.deepcopy(init)
    lr, max_norm = 1.0, 1e-3
    padded_ppo_step(policy, ref, torch.optim.SGD(policy.parameters(), lr=lr), qs, rs,
                    torch.tensor([3.0, -3.0]), kl_coef=0.05, permutations=identity_perms(2, 1),
                    ppo_epochs=1, mini_batch_size=2, max_grad_norm=max_norm)
    delta = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(params(policy), params(init))))
    assert delta.item() == pytest.approx(lr * max_norm, rel=1e-3)
