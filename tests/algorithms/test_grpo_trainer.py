"""GRPO and RLOO trainers: the packed steps equal a padded TRL 1.16-style step (tests/grpo_padded.py,
plain torch) for every loss type, with micro-batches cut into several packed rows; an exact
resume; no reference model when beta is 0; TRL's metric names; options and errors."""

import copy
import shutil

import pytest
import torch
from grpo_padded import FixedGenerator, length_reward, padded_steps, token_reward

from fastalign.algorithms.grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from fastalign.engine.metrics import read_metrics
from fastalign.errors import ConfigError
from fastalign.models.tiny import char_tokenizer, tiny_model

PROMPTS = [{"prompt": t} for t in ["39141=", "22=", "8675309=", "1=", "404404=", "77=", "123=", "98765="]]
TOL = 1e-6


def model(seed=1):
    return tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=seed)


def trainer(tmp_path, cls=GRPOTrainer, config_cls=GRPOConfig, rewards=(token_reward,), generator=True, sgd=False,
            **options):
    settings = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=6, learning_rate=1e-2, lr_scheduler_type="constant", disable_tqdm=True,
                    max_tokens_per_batch=40, seed=3)
    settings.update(options)
    gen = FixedGenerator(100) if generator else None
    policy = model()
    optimizer = torch.optim.SGD(policy.parameters(), lr=settings["learning_rate"]) if sgd else None
    return cls(policy, list(rewards), args=config_cls(**settings), train_dataset=PROMPTS,
               processing_class=char_tokenizer(), generator=gen, optimizers=(optimizer, None))


def padded_reference(t, steps: int, algorithm: str):
    """The padded step's weights after ``steps`` optimizer steps on ``t``'s one generation."""
    r, c = t.rollout, t.args
    policy = model()
    reference = copy.deepcopy(policy).eval()
    optimizer = torch.optim.SGD(policy.parameters(), lr=c.learning_rate)
    texts = t.tokenizer.batch_decode(r.layout.responses, skip_special_tokens=True)
    per_func = t.rewards.score([""] * len(texts), texts, [a.tolist() for a in r.layout.responses], {}, None)
    rewards = (per_func * t.rewards.weights).sum(1)
    truncated = torch.tensor([int(a[-1]) != 2 for a in r.layout.responses])
    advantages = padded_steps(policy, reference, optimizer, r.layout.queries, r.layout.responses, rewards, r.order, c,
                              steps, algorithm=algorithm, truncated=truncated, max_grad_norm=c.max_grad_norm)
    return policy, advantages


CASES = {
    "grpo": dict(loss_type="grpo", beta=0.04),
    "bnpo": dict(loss_type="bnpo", beta=0.04, scale_rewards="batch"),
    "dr_grpo": dict(loss_type="dr_grpo", scale_rewards="none"),
    "dapo": dict(loss_type="dapo", beta=0.1, epsilon_high=0.28, mask_truncated_completions=True),
    "dapo-iterations": dict(loss_type="dapo", beta=0.04, num_iterations=2, gradient_accumulation_steps=1,
                            steps_per_generation=1, max_steps=2, weights=[1.0, 0.5], per_device_train_batch_size=8),
    "rloo": dict(algorithm="rloo", beta=0.05),
    "rloo-normalized": dict(algorithm="rloo", beta=0.1, normalize_advantages=True, num_iterations=2,
                            gradient_accumulation_steps=1, steps_per_generation=1, max_steps=2, epsilon=0.1,
                            per_device_train_batch_size=8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_steps_equal_a_padded_trl_style_step(tmp_path, case):
    """One generation of 2 prompts x 4 completions, trained on in 2 micro-batches (or twice, with
    num_iterations=2: old log-probs), rows of at most 40 tokens (several per micro-batch): the
    advantages and the weights after the optimizer steps (SGD: the weights move by the gradient
    itself; AdamW's first steps, about lr x sign(g), would amplify float noise in tiny gradients)
    match the padded step's."""
    options = dict(CASES[case])
    algorithm = options.pop("algorithm", "grpo")
    weights = options.pop("weights", None)
    options.setdefault("gradient_accumulation_steps", 2)
    options.setdefault("max_steps", 1)
    options.setdefault("per_device_train_batch_size", 4)
    cls, config_cls = (GRPOTrainer, GRPOConfig) if algorithm == "grpo" else (RLOOTrainer, RLOOConfig)
    t = trainer(tmp_path, cls, config_cls, rewards=(token_reward, length_reward), reward_weights=weights, sgd=True,
                learning_rate=0.1, **options)
    t.train()
    assert t.rollout is not None and len(t.rollout.order) == 8
    rows = [len(q) + len(a) for q, a in zip(t.rollout.layout.queries, t.rollout.layout.responses)]
    assert sum(rows) > 2 * 40  # each micro-batch spans several packed rows
    policy, advantages = padded_reference(t, t.args.max_steps, algorithm)
    assert torch.allclose(t.rollout.advantages.cpu(), advantages, atol=1e-5), (t.rollout.advantages, advantages)
    got, want = t.model.state_dict(), policy.state_dict()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    moved = max(float((want[k] - model().state_dict()[k]).abs().max()) for k in want)
    assert worst < TOL and moved > 1e-3, (worst, moved)


def test_metric_names_are_trls(tmp_path):
    t = trainer(tmp_path, beta=0.04, max_steps=2, logging_steps=1)
    out = t.train()
    for name in ("loss", "grad_norm", "learning_rate", "reward", "reward_std", "frac_reward_zero_std",
                 "rewards/token_reward/mean", "rewards/token_reward/std", "kl", "entropy", "clip_ratio/low_mean",
                 "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max", "clip_ratio/region_mean",
                 "completions/mean_length", "completions/min_length", "completions/max_length",
                 "completions/clipped_ratio", "completions/mean_terminated_length",
                 "completions/min_terminated_length", "completions/max_terminated_length", "num_tokens", "epoch",
                 "step_time"):
        assert name in out, name
    assert 0 < out["completions/clipped_ratio"] < 1 and out["completions/max_length"] == 6
    assert out["num_tokens"] > 0 and out["kl"] >= 0 and out["steps"] == 2


def test_beta_zero_builds_no_reference(tmp_path, monkeypatch):
    """beta = 0: no reference model (no copy made), no reference forward, no kl metric; and with a
    generation used within one optimizer step, no old log-probs either (TRL's rule)."""
    copies = []
    real = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: copies.append(type(x).__name__) or real(x, *a))
    t = trainer(tmp_path, beta=0.0, max_steps=1)
    assert t.ref_model is None and t.rollouts.reference is None and not t.needs_old_logprobs
    assert not [c for c in copies if c.endswith("ForCausalLM")]
    out = t.train()
    assert "kl" not in out and t.rollout.ref_logprobs is None and t.rollout.old_logprobs is None
    with_kl = trainer(tmp_path / "kl", beta=0.04, max_steps=1)
    assert with_kl.ref_model is not None and with_kl.ref_model is not with_kl.model


def test_resume_ends_with_the_uninterrupted_weights(tmp_path):
    """Checkpoints mid-generation (num_iterations=2: the generation being trained on is saved) and
    at a generation's end; runs resumed from either (the model's own sampling, its random state
    restored) end with the uninterrupted run's weights and log the same rewards."""
    options = dict(beta=0.04, num_iterations=2, gradient_accumulation_steps=1, max_steps=6, save_steps=1,
                   save_total_limit=None, generator=False, rewards=("sort_digits",), max_completion_length=5)
    whole = trainer(tmp_path / "whole", **options)
    whole.train()
    want = whole.model.state_dict()
    logged = [r["reward"] for r in read_metrics(tmp_path / "whole" / "run") if "reward" in r]
    assert len(logged) == 3  # a generation every 2 steps
    for at in (3, 4):
        run = tmp_path / f"resumed{at}" / "run"
        shutil.copytree(tmp_path / "whole" / "run" / f"checkpoint-{at}", run / f"checkpoint-{at}")
        resumed = trainer(tmp_path / f"resumed{at}", resume_from_checkpoint=str(run / f"checkpoint-{at}"), **options)
        assert resumed.train()["steps"] == 6 - at
        got = resumed.model.state_dict()
        assert max(float((got[k] - want[k]).abs().max()) for k in want) == 0.0, at
        again = [r["reward"] for r in read_metrics(run) if "reward" in r]
        assert again == logged[-len(again):] and again, (at, again, logged)


def test_rloo_metric_names_and_kl_in_the_reward(tmp_path):
    t = trainer(tmp_path, RLOOTrainer, RLOOConfig, max_steps=1)
    out = t.train()
    assert t.ref_model is not None and t.needs_old_logprobs and t.rollout.old_logprobs is not None
    for name in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/low_mean",
                 "clip_ratio/high_max", "rewards/token_reward/mean", "completions/mean_length"):
        assert name in out, name


def test_config_derives_trls_batch_sizes():
    c = GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_generations=4)
    assert (c.steps_per_generation, c.generation_batch_size, c.prompts_per_generation) == (3, 12, 3)
    c = GRPOConfig(per_device_train_batch_size=4, generation_batch_size=16, num_generations=8)
    assert (c.steps_per_generation, c.generate_every) == (4, 4)
    assert (GRPOConfig().beta, GRPOConfig().loss_type, RLOOConfig().beta, RLOOConfig().num_generations) == \
        (0.0, "dapo", 0.05, 2)
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        GRPOConfig(per_device_train_batch_size=6, num_generations=4)
    with pytest.raises(ConfigError, match="cannot both be set"):
        GRPOConfig(generation_batch_size=16, steps_per_generation=2)
    with pytest.raises(ConfigError, match="num_generations"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ConfigError, match="reward_clip_range"):
        RLOOConfig(reward_clip_range=[1.0, 0.0])


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="reward_weights has 2 weights for 1"):
        trainer(tmp_path, reward_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="fewer than one generation"):
        trainer(tmp_path, per_device_train_batch_size=64, num_generations=4)
    with pytest.raises(ConfigError, match="prompt row 2 has 8 tokens"):
        trainer(tmp_path, max_tokens_per_batch=12)
    t = trainer(tmp_path, rewards=(lambda prompts, completions: [1.0],), max_steps=1)
    with pytest.raises(ValueError, match="returned 1 rewards for 8 completions"):
        t.train()


def test_peft_reference_is_the_model_with_adapters_disabled(tmp_path):
    """With LoRA and beta > 0 the reference is the model with its adapters off (no copy): its
    log-probs are the base model's, so the first step's KL is 0 and the second's is not."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    t = GRPOTrainer(model(), token_reward, args=GRPOConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
        learning_rate=5e-2, beta=0.04, max_steps=2, disable_tqdm=True), train_dataset=PROMPTS,
        processing_class=char_tokenizer(), generator=FixedGenerator(100), peft_config=lora)
    assert t.ref_model is None and t.is_peft and t.rollouts.reference is t.model
    t.train()
    kls = [r["kl"] for r in read_metrics(tmp_path / "run")]
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls[1] > 0, kls
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
