"""PPOTrainer: every PPOConfig knob shows its effect, the references, generation, scoring, saving,
resuming and bad input. (Equivalence with a padded TRL-style step: test_ppo_vs_padded.py.)"""

import copy
import json
import math

import pytest
import torch

from fastalign.algorithms import LengthSampler, PPOConfig, PPOTrainer
from fastalign.data import Sequence, pack
from fastalign.errors import ConfigError
from fastalign.kernels.rl import RunningMoments
from fastalign.models import CausalLMWithValueHead, as_reward_model
from fastalign.models.tiny import char_tokenizer, tiny_model

VOCAB = 100


def small(seed=0):
    return tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=seed)


def samples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = [torch.randint(4, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(4, VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g) for _ in range(n)]
    scores = torch.randn(n, generator=g)
    return queries, responses, scores


def trainer(tmp_path, model=None, optimizer=None, **overrides):
    options = dict(batch_size=8, mini_batch_size=2, ppo_epochs=2, output_dir=str(tmp_path), disable_tqdm=True)
    options.update(overrides)
    model = model or CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
    return PPOTrainer(PPOConfig(**options), model, tokenizer=char_tokenizer(), optimizer=optimizer)


def sgd(model, lr=1.0):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model):
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


def count_steps(optimizer):
    calls = []
    optimizer.register_step_post_hook(lambda *a: calls.append(1))
    return calls


# ---- batching: batch_size, mini_batch_size, gradient_accumulation_steps, ppo_epochs -------------

@pytest.mark.parametrize("mini, gas, epochs", [(2, 1, 2), (2, 2, 3), (4, 2, 1), (1, 1, 1)])
def test_optimizer_steps_and_minibatches_follow_the_batching_knobs(tmp_path, mini, gas, epochs):
    model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
    opt = sgd(model, 1e-3)
    t = trainer(tmp_path, model, opt, mini_batch_size=mini, gradient_accumulation_steps=gas, ppo_epochs=epochs)
    steps = count_steps(opt)
    stats = t.step(*samples())
    assert len(steps) == epochs * 8 // (mini * gas)
    assert stats["ppo/epochs"] == epochs
    # every sample's every response token is seen once per epoch
    assert len(stats["ppo/policy/advantages"]) == epochs * sum(len(r) for r in samples()[1])


def test_batch_size_must_match_the_samples(tmp_path):
    t = trainer(tmp_path)
    q, r, s = samples(6)
    with pytest.raises(ValueError, match="batch_size is 8 but queries holds 6"):
        t.step(q, r, s)
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        PPOConfig(batch_size=8, mini_batch_size=3)


def test_learning_rate_scales_the_update(tmp_path):
    deltas = []
    for lr in (0.0, 1e-4, 2e-4):
        model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
        t = trainer(tmp_path, model, learning_rate=lr, ppo_epochs=1, mini_batch_size=8)
        before = model.pretrained_model.lm_head.weight.detach().clone()
        t.step(*samples())
        deltas.append((model.pretrained_model.lm_head.weight - before).abs().max().item())
    assert deltas[0] == 0 and deltas[1] > 0
    assert deltas[2] == pytest.approx(2 * deltas[1], rel=0.05)  # AdamW's first step moves ~lr per weight


def test_seed_repeats_a_step_and_another_seed_shuffles_differently(tmp_path):
    out = []
    for seed in (3, 3, 4):
        model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
        t = trainer(tmp_path, model, sgd(model, 0.1), seed=seed)
        t.step(*samples())
        out.append(weights(model))
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])
    assert any(not torch.equal(out[0][k], out[2][k]) for k in out[0])


# ---- KL: kl_penalty, adap_kl_ctrl, init_kl_coef, target, horizon ----------------------------------

def _trained_away(tmp_path, **overrides):
    """A trainer whose policy has moved off its reference (so KL terms are non-zero)."""
    model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
    t = trainer(tmp_path, model, **overrides)
    with torch.no_grad():
        for p in model.pretrained_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return t


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "full"])
def test_kl_penalty_kinds(tmp_path, kind):
    t = _trained_away(tmp_path, kl_penalty=kind, ppo_epochs=1)
    q, r, s = samples()
    policy = copy.deepcopy(t.model.pretrained_model).eval()  # as the rollout sees it
    t.step(q, r, s)
    ro = t.last_rollout
    d = ro.logprobs - ro.ref_logprobs
    if kind == "full":  # exact KL(policy || reference) over the vocabulary, from full logits
        expect = []
        ref = t.ref_model
        for qi, ri in zip(q, r):
            ids = torch.cat([qi, ri])[None]
            with torch.no_grad():
                lp = torch.log_softmax(policy(ids).logits[0, len(qi) - 1:-1].float(), -1)
                lq = torch.log_softmax(ref(ids).logits[0, len(qi) - 1:-1].float(), -1)
            expect.append((lp.exp() * (lp - lq)).sum(-1))
        expect = torch.cat(expect)
    else:
        expect = {"kl": d, "abs": d.abs(), "mse": 0.5 * d**2}[kind]
    assert expect.abs().max() > 1e-3
    torch.testing.assert_close(ro.kls, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ro.non_score_rewards, -0.2 * expect, rtol=1e-5, atol=1e-6)
    if kind == "full":
        assert (ro.kls >= 0).all()


def test_adaptive_kl_controller_moves_the_coefficient_toward_target(tmp_path):
    t = _trained_away(tmp_path, init_kl_coef=0.3, target=1e-4, horizon=100, ppo_epochs=1)
    stats = t.step(*samples())
    kl = stats["objective/kl"]
    assert kl > 1e-4  # above target: the coefficient grows by the clipped error
    assert stats["objective/kl_coef"] == 0.3  # the stats show the coefficient the step used
    assert t.kl_ctl.value == pytest.approx(0.3 * (1 + min(kl / 1e-4 - 1, 0.2) * 8 / 100))
    low = _trained_away(tmp_path, init_kl_coef=0.3, target=1e4, horizon=100, ppo_epochs=1)
    low.step(*samples())
    assert low.kl_ctl.value == pytest.approx(0.3 * (1 - 0.2 * 8 / 100))


def test_fixed_kl_coefficient_without_adap_kl_ctrl(tmp_path):
    t = _trained_away(tmp_path, adap_kl_ctrl=False, init_kl_coef=0.05, ppo_epochs=1)
    t.step(*samples())
    t.step(*samples(seed=1))
    assert t.kl_ctl.value == 0.05
    torch.testing.assert_close(t.last_rollout.non_score_rewards, -0.05 * t.last_rollout.kls)


# ---- the loss: cliprange, cliprange_value, vf_coef, ratio_threshold, max_grad_norm ----------------

def test_cliprange_clips_the_policy_ratio(tmp_path):
    fracs = []
    for clip in (1e-4, 10.0):
        model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
        t = trainer(tmp_path, model, sgd(model, 0.5), cliprange=clip, ppo_epochs=3)
        fracs.append(t.step(*samples())["ppo/policy/clipfrac"])
    assert fracs[0] > 0.1 and fracs[1] == 0


def test_cliprange_value_clips_the_value_prediction(tmp_path):
    fracs = []
    for clip in (1e-4, 100.0):
        model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
        t = trainer(tmp_path, model, sgd(model, 1.0), cliprange_value=clip, ppo_epochs=3)
        fracs.append(t.step(*samples())["ppo/val/clipfrac"])
    assert fracs[0] > 0.1 and fracs[1] == 0


def test_vf_coef_zero_leaves_the_value_head_untrained(tmp_path):
    for coef, moves in ((0.0, False), (0.1, True)):
        model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
        t = trainer(tmp_path, model, sgd(model, 0.1), vf_coef=coef)
        before = weights(model)
        stats = t.step(*samples())
        assert ("v_head.summary.weight" in changed(before, model)) == moves
        assert stats["ppo/loss/total"] == pytest.approx(stats["ppo/loss/policy"] + coef * stats["ppo/loss/value"], rel=1e-5)


def test_ratio_threshold_skips_the_minibatches(tmp_path):
    model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
    t = trainer(tmp_path, model, sgd(model, 0.1), ratio_threshold=0.5)  # every mean ratio (~1) is above it
    before = weights(model)
    with pytest.warns(UserWarning, match="exceeds threshold"):
        stats = t.step(*samples())
    assert not changed(before, model)
    assert stats["ppo/loss/total"] == 0


def test_max_grad_norm_bounds_each_update(tmp_path):
    model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
    t = trainer(tmp_path, model, sgd(model, 1.0), max_grad_norm=1e-3, ppo_epochs=1, mini_batch_size=8)
    before = [p.detach().clone() for p in model.parameters()]
    t.step(*samples())
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < moved <= 1e-3 * 1.0001  # SGD lr 1: the step is the clipped gradient


# ---- early_stopping and target_kl -------------------------------------------------------------

def test_early_stopping_ends_the_step_when_policy_kl_exceeds_1_5_target(tmp_path):
    runs = {}
    for stop, target in ((True, 1e-9), (True, 1e9), (False, 1e-9)):
        model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
        opt = sgd(model, 1.0)
        t = trainer(tmp_path, model, opt, early_stopping=stop, target_kl=target, ppo_epochs=4)
        steps = count_steps(opt)
        runs[stop, target] = (t.step(*samples())["ppo/epochs"], len(steps))
    assert runs[True, 1e-9] == (1, 4)  # first pass's KL exceeds 1.5e-9: stop after it
    assert runs[True, 1e9] == (4, 16) and runs[False, 1e-9] == (4, 16)


# ---- scores: use_score_scaling, use_score_norm, score_clip -------------------------------------------

def test_score_scaling_divides_by_the_running_std(tmp_path):
    t = trainer(tmp_path, use_score_scaling=True, ppo_epochs=1)
    running = RunningMoments()
    for seed in (0, 1):
        q, r, s = samples(seed=seed)
        s = 3 * s + 5
        stats = t.step(q, r, s)
        running.update(s)
        expect = s / (running.std + torch.finfo(torch.float32).eps)
        torch.testing.assert_close(t.last_rollout.scores, expect)
        assert stats["env/reward_mean"] == pytest.approx(float(s.mean()))  # raw scores
        assert stats["ppo/mean_scores"] == pytest.approx(float(expect.mean()), rel=1e-5)


def test_score_norm_also_centres(tmp_path):
    t = trainer(tmp_path, use_score_scaling=True, use_score_norm=True, ppo_epochs=1)
    q, r, s = samples()
    s = 3 * s + 5
    t.step(q, r, s)
    torch.testing.assert_close(t.last_rollout.scores, (s - s.mean()) / s.std(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="use_score_scaling"):
        PPOConfig(use_score_norm=True)


def test_score_clip(tmp_path):
    t = trainer(tmp_path, score_clip=0.5, ppo_epochs=1)
    q, r, s = samples()
    t.step(q, r, s)
    assert s.abs().max() > 0.5
    torch.testing.assert_close(t.last_rollout.scores, s.clamp(-0.5, 0.5))


def test_whiten_rewards_whitens_over_response_tokens(tmp_path):
    # Only the rewards change: the advantages differ from the unwhitened step's.
    adv = []
    for whiten in (False, True):
        t = trainer(tmp_path, whiten_rewards=whiten, ppo_epochs=1)
        t.step(*samples())
        adv.append(t.last_rollout.advantages)
    assert not torch.allclose(adv[0], adv[1])


def test_gamma_and_lam_shape_the_advantages(tmp_path):
    # lam = 0: one-step TD errors; gamma = 0 too: r - v. (Advantages come back whitened.)
    t = trainer(tmp_path, gamma=0.0, lam=0.0, ppo_epochs=1)
    t.step(*samples())
    ro = t.last_rollout
    raw = ro.rewards - ro.values
    torch.testing.assert_close(ro.returns, ro.rewards, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ro.advantages, (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8), rtol=1e-4, atol=1e-5)


# ---- response masks ----------------------------------------------------------------------------

def test_response_masks_remove_tokens_from_kl_and_loss(tmp_path):
    q, r, s = samples()
    masks = [torch.ones_like(x) for x in r]
    for m in masks:
        if len(m) > 1:
            m[0] = 0
    t = _trained_away(tmp_path, ppo_epochs=1)
    stats = t.step(q, r, s, response_masks=masks)
    ro = t.last_rollout
    assert ro.mask.tolist() == torch.cat(masks).float().tolist()
    kl = torch.stack([(ro.kls * ro.mask)[a:b].sum() for a, b in zip(ro.cu[:-1], ro.cu[1:])]).mean()
    assert stats["objective/kl"] == pytest.approx(float(kl), rel=1e-5)
    with pytest.raises(ValueError, match="response_masks\\[0\\]"):
        t.step(q, r, s, response_masks=[m[:-1] for m in masks])


# ---- references --------------------------------------------------------------------------------

def test_reference_is_a_frozen_copy_by_default(tmp_path):
    model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
    t = trainer(tmp_path, model, sgd(model, 0.1))
    ref_before = weights(t.ref_model)
    t.step(*samples())
    assert not changed(ref_before, t.ref_model)
    assert changed(weights(small()), model.pretrained_model)
    assert not any(p.requires_grad for p in t.ref_model.parameters())


def test_num_shared_layers_shares_and_freezes_the_bottom_layers(tmp_path):
    model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
    t = PPOTrainer(PPOConfig(batch_size=8, mini_batch_size=2, output_dir=str(tmp_path), disable_tqdm=True), model,
                   tokenizer=char_tokenizer(), num_shared_layers=1)
    lm, ref = model.pretrained_model, t.ref_model
    assert ref.model.embed_tokens.weight is lm.model.embed_tokens.weight
    assert ref.model.layers[0].mlp.up_proj.weight is lm.model.layers[0].mlp.up_proj.weight
    assert ref.model.layers[1].mlp.up_proj.weight is not lm.model.layers[1].mlp.up_proj.weight
    assert not lm.model.layers[0].mlp.up_proj.weight.requires_grad and lm.model.layers[1].mlp.up_proj.weight.requires_grad
    top = lm.model.layers[1].mlp.up_proj.weight.detach().clone()
    bottom = lm.model.layers[0].mlp.up_proj.weight.detach().clone()
    t.step(*samples())
    assert not torch.equal(top, lm.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(bottom, lm.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(ref.model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="num_shared_layers must be in"):
        PPOTrainer(PPOConfig(batch_size=8, output_dir=str(tmp_path)), small(), tokenizer=char_tokenizer(),
                   num_shared_layers=5)


def test_peft_reference_is_the_model_without_adapters(tmp_path):
    from peft import LoraConfig

    base = small()
    untouched = copy.deepcopy(base).eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    t = PPOTrainer(PPOConfig(batch_size=8, mini_batch_size=2, ppo_epochs=1, output_dir=str(tmp_path), disable_tqdm=True),
                   base, tokenizer=char_tokenizer(), peft_config=lora)
    assert t.ref_model is None and t.is_peft_model
    q, r, s = samples()
    t.step(q, r, s)
    ro = t.last_rollout
    expect = []
    for qi, ri in zip(q, r):
        with torch.no_grad():
            logits = untouched(torch.cat([qi, ri])[None]).logits[0, len(qi) - 1:-1]
        expect.append(torch.log_softmax(logits.float(), -1).gather(-1, ri[:, None])[:, 0])
    torch.testing.assert_close(ro.ref_logprobs, torch.cat(expect), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ro.logprobs, ro.ref_logprobs)  # the adapters (random init) change the policy
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("v_head") for n in trainable)


def test_separate_ref_model(tmp_path):
    other = small(seed=7)
    t = PPOTrainer(PPOConfig(batch_size=8, mini_batch_size=2, ppo_epochs=1, output_dir=str(tmp_path), disable_tqdm=True),
                   small(), ref_model=other, tokenizer=char_tokenizer())
    assert t.ref_model is other
    q, r, s = samples()
    t.step(q, r, s)
    with torch.no_grad():
        logits = other(torch.cat([q[0], r[0]])[None]).logits[0, len(q[0]) - 1:-1]
    expect = torch.log_softmax(logits.float(), -1).gather(-1, r[0][:, None])[:, 0]
    torch.testing.assert_close(t.last_rollout.ref_logprobs[:len(r[0])], expect, rtol=1e-5, atol=1e-5)


# ---- generation ---------------------------------------------------------------------------------

def test_generate_left_pads_batches_like_each_prompt_alone(tmp_path):
    t = trainer(tmp_path)
    q, _, _ = samples(5)
    kwargs = dict(do_sample=False, max_new_tokens=6, eos_token_id=None)
    batched = t.generate(q, batch_size=5, return_prompt=False, **kwargs)
    alone = [t.generate(x, **kwargs)[0, len(x):] for x in q]
    assert all(torch.equal(a, b) for a, b in zip(batched, alone))
    with_prompt = t.generate(q, batch_size=2, **kwargs)
    assert all(torch.equal(w, torch.cat([x, a])) for w, x, a in zip(with_prompt, q, batched))


def test_generate_cuts_after_eos_and_samples_lengths(tmp_path):
    t = trainer(tmp_path)
    q, _, _ = samples(8)
    eos = t.tokenizer.eos_token_id
    with torch.no_grad():  # make eos likely
        t.model.pretrained_model.lm_head.bias = None
        t.model.pretrained_model.lm_head.weight[eos] += 0.5
    out = t.generate(q, batch_size=4, return_prompt=False, do_sample=True, max_new_tokens=12)
    for o in out:
        hits = (o == eos).nonzero()
        assert len(hits) == 0 or int(hits[0]) == len(o) - 1  # nothing after the first eos
    lengths = set()
    torch.manual_seed(0)
    for _ in range(6):
        out = t.generate(q[:1], length_sampler=LengthSampler(2, 5), return_prompt=False, do_sample=True,
                         eos_token_id=None)
        lengths.add(len(out[0]))
    assert lengths <= {2, 3, 4} and len(lengths) > 1


def test_generate_ref_response_comes_from_the_reference(tmp_path):
    t = _trained_away(tmp_path)
    q, _, _ = samples(3)
    out, ref = t.generate(q, generate_ref_response=True, return_prompt=False, do_sample=False, max_new_tokens=5,
                          eos_token_id=None)
    alone = [t.ref_model.generate(x[None], do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=None)[0, len(x):]
             for x in q]
    assert all(torch.equal(a, b) for a, b in zip(ref, alone))


# ---- reward model, saving, logging, resuming ------------------------------------------------------

def test_reward_model_scores_packed_sequences(tmp_path):
    reward = as_reward_model(small(seed=3)).eval()
    t = PPOTrainer(PPOConfig(batch_size=8, output_dir=str(tmp_path), disable_tqdm=True, max_tokens_per_batch=24),
                   small(), tokenizer=char_tokenizer(), reward_model=reward)
    q, r, _ = samples()
    scores = t.score(q, r)
    with torch.no_grad():
        expect = torch.stack([reward(torch.cat([a, b])[None]).logits[0, 0] for a, b in zip(q, r)])
    torch.testing.assert_close(scores, expect, rtol=1e-5, atol=1e-5)


def rows(n=32):
    from fastalign.tasks import sort_digits

    return [{"query": r["prompt"]} for r in sort_digits.make_rows(n, seed=5)]


def digit_reward(queries, responses):
    return [sum(c.isdigit() for c in r) / 8 for r in responses]


def test_train_logs_trl_stats_and_saves_a_value_head_model(tmp_path):
    t = PPOTrainer(PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=1, max_steps=2, output_dir=str(tmp_path),
                             disable_tqdm=True), small(), tokenizer=char_tokenizer(), dataset=rows())
    out = t.train(digit_reward, {"max_new_tokens": 4})
    assert out["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("objective/kl", "objective/kl_coef", "ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/val/vpred",
                "ppo/returns/mean", "env/reward_mean", "time/ppo/generation", "time/ppo/forward_pass"):
        assert key in records[-1] and math.isfinite(records[-1][key]), key
    loaded = CausalLMWithValueHead.from_pretrained(str(tmp_path)).eval()
    t.model.eval()
    b = pack([[Sequence(list(range(4, 14)))]])
    from fastalign.models import packed_logprobs_and_values

    with torch.no_grad():
        torch.testing.assert_close(packed_logprobs_and_values(loaded, b).values,
                                   packed_logprobs_and_values(t.model, b).values)


def test_train_needs_a_reward_and_prompts(tmp_path):
    t = trainer(tmp_path)
    with pytest.raises(ValueError, match="dataset of prompts"):
        t.train(digit_reward)
    t = PPOTrainer(PPOConfig(batch_size=8, output_dir=str(tmp_path)), small(), tokenizer=char_tokenizer(), dataset=rows())
    with pytest.raises(ValueError, match="reward_fn or"):
        t.train()


def test_a_killed_run_resumes_where_its_checkpoint_left_off(tmp_path):
    def run(out, steps, resume=None, save=None):
        config = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=1, max_steps=steps, output_dir=str(out),
                           disable_tqdm=True, save_steps=save, resume_from_checkpoint=resume, adap_kl_ctrl=True,
                           init_kl_coef=0.3, target=0.01, use_score_scaling=True, learning_rate=1e-3)
        t = PPOTrainer(config, small(), tokenizer=char_tokenizer(), dataset=rows())
        t.train(digit_reward, {"max_new_tokens": 4})
        return t

    whole = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2, save=2)
    resumed = run(tmp_path / "b", 3, resume=True)
    assert resumed.kl_ctl.value == whole.kl_ctl.value and resumed.running.count == whole.running.count
    for k, v in weights(whole.model).items():
        torch.testing.assert_close(weights(resumed.model)[k], v, rtol=0, atol=0, msg=k)


def test_a_given_lr_scheduler_is_checkpointed_and_resumed(tmp_path):
    def build(resume=None):
        model = CausalLMWithValueHead(small(), summary_dropout_prob=0.0)
        optimizer = sgd(model, lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        config = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=1, output_dir=str(tmp_path), disable_tqdm=True,
                           resume_from_checkpoint=resume)
        return PPOTrainer(config, model, tokenizer=char_tokenizer(), optimizer=optimizer, lr_scheduler=scheduler)

    first = build()
    for seed in range(2):
        first.step(*samples(seed=seed))
    first.save_checkpoint()
    resumed = build(resume=True)
    assert resumed.resume(True) == 2
    assert resumed.lr_scheduler.last_epoch == first.lr_scheduler.last_epoch == 2
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)


def test_steps_by_hand_count_in_checkpoints_and_train(tmp_path):
    """``global_step`` (TRL's ``current_step``) counts every ``step()`` call: a checkpoint saved after
    2 steps by hand is checkpoint-2 and resumes at 2, and ``train()`` on that trainer goes on from 2
    exactly as the resumed one does (the steps by hand used to leave the checkpoint named 0, and
    ``train()`` started the run over)."""
    def build(out, resume=None):
        config = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=1, max_steps=3, output_dir=str(out),
                           disable_tqdm=True, resume_from_checkpoint=resume, use_score_scaling=True,
                           learning_rate=1e-3)
        return PPOTrainer(config, small(), tokenizer=char_tokenizer(), dataset=rows())

    live = build(tmp_path / "a")
    for seed in range(2):
        live.step(*samples(seed=seed))
    assert live.global_step == live.current_step == 2
    path = live.save_checkpoint()
    assert path.name == "checkpoint-2"
    assert live.train(digit_reward, {"max_new_tokens": 4})["steps"] == 1 and live.current_step == 3
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3]

    resumed = build(tmp_path / "b", resume=str(path))
    assert resumed.train(digit_reward, {"max_new_tokens": 4})["steps"] == 1 and resumed.current_step == 3
    assert resumed.kl_ctl.value == live.kl_ctl.value and resumed.running.count == live.running.count
    for k, v in weights(live.model).items():
        torch.testing.assert_close(weights(resumed.model)[k], v, rtol=0, atol=0, msg=k)
    assert live.train(digit_reward)["steps"] == 0  # the run's max_steps are done: raise it to go on


def test_bad_samples_name_the_sample(tmp_path):
    t = trainer(tmp_path)
    q, r, s = samples()
    with pytest.raises(ValueError, match=r"responses\[2\] is empty"):
        t.step(q, r[:2] + [torch.tensor([], dtype=torch.long)] + r[3:], s)
    with pytest.raises(ValueError, match=r"queries\[1\], position 0: token id 500"):
        t.step(q[:1] + [torch.tensor([500, 5])] + q[2:], r, s)
    with pytest.raises(ValueError, match=r"scores\[3\] is nan"):
        t.step(q, r, torch.cat([s[:3], torch.tensor([float("nan")]), s[4:]]))
    with pytest.raises(ValueError, match="dataset row 1"):
        PPOTrainer(PPOConfig(batch_size=1, output_dir=str(tmp_path)), small(), tokenizer=char_tokenizer(),
                   dataset=[{"query": "12="}, {"text": "x"}])


def test_a_prompt_too_long_for_its_budget_is_named_before_any_generation(tmp_path, monkeypatch):
    prompts = rows() + [{"query": "7" * 40 + "="}]  # 41 tokens + 16 new ones > 48
    t = PPOTrainer(PPOConfig(batch_size=8, max_steps=1, max_tokens_per_batch=48, output_dir=str(tmp_path),
                             disable_tqdm=True), small(), tokenizer=char_tokenizer(), dataset=prompts)
    monkeypatch.setattr(t, "generate", lambda *a, **k: pytest.fail("generated before checking the prompts"))
    with pytest.raises(ConfigError, match=rf"prompt row {len(prompts) - 1} has \d+ tokens.*max_new_tokens=16"):
        t.train(digit_reward, {"max_new_tokens": 16})
    # Prompts read from a data file: the message names the file too.
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in prompts))
    t = PPOTrainer(PPOConfig(batch_size=8, max_steps=1, max_tokens_per_batch=48, output_dir=str(tmp_path / "file"),
                             disable_tqdm=True), small(), tokenizer=char_tokenizer(), dataset=str(path))
    with pytest.raises(ConfigError, match=rf"^{path}: prompt row {len(prompts) - 1} has \d+ tokens"):
        t.train(digit_reward, {"max_new_tokens": 16})


def test_a_batch_larger_than_the_prompts_is_a_config_error(tmp_path):
    from fastalign.errors import ConfigError

    prompts = [{"query": f"{i}+1="} for i in range(3)]
    with pytest.raises(ConfigError, match=r"batch_size=8 \(x 1 processes\) is more than the 3 prompts"):
        PPOTrainer(PPOConfig(batch_size=8, output_dir=str(tmp_path)), small(), tokenizer=char_tokenizer(),
                   dataset=prompts)
