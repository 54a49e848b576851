"""DDPOTrainer on the built-in tiny Stable Diffusion pipeline: the recorded trajectories, the
loss and its gradient against a hand-written reference, batching, advantages, LoRA, rewards,
hooks, checkpoints and resume, saving."""

import json
import random

import numpy as np
import pytest
import torch

from helpers import assert_close

pytest.importorskip("diffusers", reason="DDPO needs diffusers (pip install fastalign[diffusion])")

from fastalign.algorithms.ddpo import DDPOConfig, DDPOTrainer, image_grid  # noqa: E402
from fastalign.engine.metrics import read_metrics  # noqa: E402
from fastalign.errors import CheckpointError  # noqa: E402
from fastalign.kernels.ddpo import ddim_step_with_logprob, ddpo_loss  # noqa: E402
from fastalign.kernels.rl import PerPromptStatTracker  # noqa: E402
from fastalign.models.tiny import tiny_diffusion_pipeline  # noqa: E402
from fastalign.tasks.compressibility import (  # noqa: E402
    animal_prompt,
    jpeg_compressibility,
    jpeg_incompressibility,
    jpeg_size_kb,
)

PROMPTS = ["cat", "dog", "a red fox", "cow"]


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), num_epochs=2, sample_num_steps=4, sample_batch_size=4,
                sample_num_batches_per_epoch=1, train_batch_size=2, train_gradient_accumulation_steps=1,
                train_learning_rate=1e-3, sample_guidance_scale=3.0, mixed_precision="no", use_lora=False,
                disable_tqdm=True)
    return DDPOConfig(**{**base, **kw})


def _trainer(tmp_path, reward=jpeg_compressibility, prompt=animal_prompt, hook=None, seed=0, **kw):
    return DDPOTrainer(_config(tmp_path, **kw), reward, prompt, tiny_diffusion_pipeline(32, seed=seed), hook)


def _cycle(prompts):
    state = {"i": 0}

    def prompt_fn():
        p = prompts[state["i"] % len(prompts)]
        state["i"] += 1
        return p, {"index": state["i"] - 1}

    return prompt_fn


# ---- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(sample_batch_size=3, train_batch_size=2), "multiple of train_batch_size"),
    (dict(sample_batch_size=4, train_batch_size=2, train_gradient_accumulation_steps=3), "optimizer step"),
    (dict(sample_eta=0.0), "sample_eta"),
    (dict(train_timestep_fraction=0.1), "train_timestep_fraction"),
    (dict(train_cfg=False, sample_guidance_scale=5.0), "train_cfg=False"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(train_clip_range=0.0), "train_clip_range"),
])
def test_config_rejects_inconsistent_settings(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **kw)


def test_config_counts():
    c = DDPOConfig(sample_num_steps=10, train_timestep_fraction=0.5, sample_batch_size=8, sample_num_batches_per_epoch=3,
                   train_batch_size=4, train_gradient_accumulation_steps=2, train_num_inner_epochs=2)
    assert (c.num_train_timesteps, c.samples_per_epoch, c.samples_per_optimizer_step) == (5, 24, 8)
    assert c.optimizer_steps_per_epoch == 6


# ---- sampling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance, lora", [(3.0, False), (1.0, False), (3.0, True)])
def test_sampling_records_a_trajectory_whose_log_probs_the_training_forward_reproduces(tmp_path, guidance, lora):
    trainer = _trainer(tmp_path, sample_guidance_scale=guidance, use_lora=lora)
    samples, images = trainer.sample(PROMPTS)
    steps = trainer.config.sample_num_steps
    assert images.shape == (4, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert samples["latents"].shape == (4, steps, 4, 8, 8) and samples["log_probs"].shape == (4, steps)
    assert torch.equal(samples["next_latents"][:, :-1], samples["latents"][:, 1:])
    assert torch.equal(samples["timesteps"][0], trainer.pipeline.scheduler.timesteps.long())
    assert torch.isfinite(samples["log_probs"]).all()
    # Before any update the policy is the sampler: every ratio is exactly 1.
    samples["advantages"] = torch.ones(4)
    trainer.unet.train()
    with torch.no_grad():
        for j in range(steps):
            for part in (slice(0, 4), slice(1, 3)):  # whole batch and a sub-batch
                _, approx_kl, clipfrac = trainer._step_loss({k: v[part] for k, v in samples.items()}, j)
                assert float(approx_kl) < 1e-12 and float(clipfrac) == 0.0


def test_generate_is_seeded_and_leaves_the_training_noise_alone(tmp_path):
    trainer = _trainer(tmp_path)
    state = trainer.generator.get_state()
    a, b = trainer.generate(PROMPTS, seed=3), trainer.generate(PROMPTS, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, trainer.generate(PROMPTS, seed=4))
    assert torch.equal(trainer.generator.get_state(), state)
    # The prompt conditions the image (guided sampling).
    assert not torch.equal(trainer.generate(["cat"] * 2, seed=3), trainer.generate(["dog"] * 2, seed=3))


# ---- the loss and its gradient -------------------------------------------------------------------
def _reference_gradient(trainer, samples, order, perms, num_t, batch_size, gas):
    """The accumulated gradient of one optimizer step, written out: the mean over the step's
    batches and trained timesteps of the clipped loss, each log-prob from a guided UNet forward."""
    c, unet, scheduler = trainer.config, trainer.unet, trainer.pipeline.scheduler
    unet.zero_grad(set_to_none=True)
    total = 0.0
    for b in range(gas):
        rows = order[b * batch_size:(b + 1) * batch_size]
        for j in range(num_t):
            steps = perms[rows, j]
            lat = samples["latents"][rows, steps]
            t = samples["timesteps"][rows, steps]
            out = unet(torch.cat([lat, lat]), torch.cat([t, t]),
                       torch.cat([samples["negative_prompt_embeds"][rows], samples["prompt_embeds"][rows]])).sample
            uncond, cond = out.chunk(2)
            noise = uncond + c.sample_guidance_scale * (cond - uncond)
            _, lp = ddim_step_with_logprob(scheduler, noise, t, lat, eta=c.sample_eta,
                                           prev_sample=samples["next_latents"][rows, steps])
            ratio = torch.exp(lp - samples["log_probs"][rows, steps])
            total = total + ddpo_loss(samples["advantages"][rows], ratio, c.train_clip_range, c.train_adv_clip_max)
    (total / (gas * num_t)).backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_an_optimizer_step_accumulates_the_mean_loss_over_its_batches_and_sampled_timesteps(tmp_path):
    trainer = _trainer(tmp_path, sample_num_steps=4, train_timestep_fraction=0.5, train_batch_size=2,
                       train_gradient_accumulation_steps=2, train_learning_rate=0.0)
    samples, _ = trainer.sample(PROMPTS)
    samples["advantages"] = torch.tensor([1.5, -0.5, 7.0, -1.0])  # 7 is clipped to adv_clip_max 5
    # The shuffle the trainer will draw: the samples' order, then each sample's timestep order.
    gen = torch.Generator().manual_seed(0)
    gen.set_state(trainer.perm_generator.get_state())
    order = torch.randperm(4, generator=gen)
    perms = torch.empty(4, 4, dtype=torch.long)  # by original sample: the i-th draw is for sample order[i]
    perms[order] = torch.stack([torch.randperm(4, generator=gen) for _ in range(4)])
    captured = []
    step = trainer.engine.step

    def capture():
        captured.append({n: p.grad.clone() for n, p in trainer.unet.named_parameters() if p.grad is not None})
        return step()

    trainer.engine.step = capture
    records = trainer._train_epoch(samples, epoch=0)
    assert len(records) == 1 and len(captured) == 1
    expected = _reference_gradient(trainer, samples, order, perms, num_t=2, batch_size=2, gas=2)
    assert captured[0].keys() == expected.keys()
    for name, grad in expected.items():
        assert_close(captured[0][name], grad, 1e-4, name)
    assert records[0]["approx_kl"] < 1e-12 and records[0]["clipfrac"] == 0.0


def test_optimizer_steps_and_unet_forwards_follow_the_batching(tmp_path):
    trainer = _trainer(tmp_path, sample_num_steps=4, train_timestep_fraction=0.75, sample_batch_size=4,
                       sample_num_batches_per_epoch=2, train_batch_size=2, train_gradient_accumulation_steps=2,
                       train_num_inner_epochs=2)
    forwards = []
    trainer.unet.register_forward_hook(lambda m, i, o: forwards.append(m.training))
    assert trainer.step(0, 10) == 10 + trainer.config.optimizer_steps_per_epoch == 14
    sampling = 2 * 4  # two batches of 4 steps
    training = 2 * (8 // 2) * 3  # inner epochs x batches x trained timesteps
    assert forwards.count(False) == sampling and forwards.count(True) == training
    # Later inner epochs see an updated policy: ratios move off 1.
    assert trainer.last_stats["approx_kl"] > 0


def test_clipping_activates_once_the_policy_moves(tmp_path):
    trainer = _trainer(tmp_path, sample_batch_size=4, train_batch_size=1, train_learning_rate=1e-2,
                       train_clip_range=1e-4, train_num_inner_epochs=2)
    trainer.step(0, 0)
    assert trainer.last_stats["clipfrac"] > 0.1


# ---- advantages ----------------------------------------------------------------------------------
def test_advantages_are_normalised_over_the_epoch_or_per_prompt(tmp_path):
    rewards = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
    prompts = ["a", "b", "a", "b"]
    glob = _trainer(tmp_path)._advantages(rewards, prompts)
    r = rewards.numpy()
    assert np.allclose(glob.numpy(), (r - r.mean()) / (r.std() + 1e-8))
    tracked = _trainer(tmp_path, per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=4,
                       per_prompt_stat_tracking_min_count=2)
    expected = PerPromptStatTracker(4, 2).update(np.array(prompts), r)
    assert np.allclose(tracked._advantages(rewards, prompts).numpy(), expected)
    assert np.allclose(expected, [-1, -1, 1, 1])  # each prompt against its own two rewards


# ---- what is trained -----------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True])
def test_only_the_unet_or_its_adapters_train(tmp_path, lora):
    trainer = _trainer(tmp_path, use_lora=lora, train_learning_rate=1e-2)
    pipe = trainer.pipeline
    before = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("unet", "vae", "text_encoder")}
    trainer.step(0, 0)
    for name in ("vae", "text_encoder"):
        assert all(torch.equal(v, before[name][k]) for k, v in getattr(pipe, name).state_dict().items())
    changed = {k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before["unet"][k])}
    assert changed
    if lora:
        assert all("lora" in k for k in changed) and all(p.dtype == torch.float32 for p in trainer.trainable)
        assert {p.requires_grad for n, p in pipe.unet.named_parameters() if "lora" not in n} == {False}
    else:
        assert len(trainer.trainable) == len(list(pipe.unet.parameters()))


def test_fp16_falls_back_to_fp32_on_the_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs as asked on CUDA")
    with pytest.warns(UserWarning, match="fp32 on the CPU"):
        trainer = _trainer(tmp_path, mixed_precision="fp16")
    assert trainer.precision is None and trainer.pipeline.vae.dtype == torch.float32


def test_bf16_mixed_precision_runs_with_frozen_parts_cast(tmp_path):
    trainer = _trainer(tmp_path, mixed_precision="bf16", use_lora=True)
    assert trainer.pipeline.vae.dtype == torch.bfloat16 and trainer.pipeline.text_encoder.dtype == torch.bfloat16
    trainer.step(0, 0)
    assert np.isfinite(trainer.last_stats["loss"]) and all(p.dtype == torch.float32 for p in trainer.trainable)


# ---- rewards and hooks ---------------------------------------------------------------------------
def test_rewards_prompts_metadata_and_the_image_hook(tmp_path):
    seen, hooked = [], []

    def reward(images, prompts, metadata):
        seen.append((images.shape, list(prompts), list(metadata)))
        return torch.arange(len(prompts), dtype=torch.float32), {"note": "ok"}

    trainer = _trainer(tmp_path, reward=reward, prompt=_cycle(PROMPTS), sample_num_batches_per_epoch=2,
                       hook=lambda data, step, logger: hooked.append((data, step)))
    trainer.step(0, 5)
    assert [s[1] for s in seen] == [PROMPTS, PROMPTS]
    assert [m["index"] for m in seen[1][2]] == [4, 5, 6, 7] and seen[0][0] == (4, 3, 32, 32)
    (data, step), = hooked
    images, prompts, metadata, rewards, reward_metadata = data[0]
    assert step == 5 and images.shape == (4, 3, 32, 32) and prompts == PROMPTS
    assert rewards.tolist() == [0, 1, 2, 3] and reward_metadata == {"note": "ok"}
    assert trainer.last_stats["reward_mean"] == 1.5


def test_async_rewards_match_inline_ones(tmp_path):
    stats = []
    for asynchronous in (False, True):
        random.seed(0)
        trainer = _trainer(tmp_path, sample_num_batches_per_epoch=2, async_reward_computation=asynchronous)
        trainer.step(0, 0)
        stats.append(trainer.last_stats)
    assert stats[0]["reward_mean"] == stats[1]["reward_mean"] and stats[0]["loss"] == stats[1]["loss"]


@pytest.mark.parametrize("bad, message", [
    (lambda images, p, m: [1.0, 2.0], "returned 2 rewards for 4 images"),
    (lambda images, p, m: ([0.0, 0.0, float("nan"), 0.0], {}), r"image 2 \(prompt 'a red fox'\)"),
])
def test_bad_rewards_are_named(tmp_path, bad, message):
    trainer = _trainer(tmp_path, reward=bad, prompt=_cycle(PROMPTS))
    with pytest.raises(ValueError, match=message):
        trainer.step(0, 0)


def test_jpeg_rewards_rank_flat_images_as_compressible():
    flat = torch.full((2, 3, 32, 32), 0.5)
    noisy = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    flat_kb, noisy_kb = jpeg_size_kb(flat), jpeg_size_kb(noisy)
    assert max(flat_kb) < min(noisy_kb)
    assert jpeg_compressibility(flat)[0].tolist() == [-x for x in flat_kb]
    assert jpeg_incompressibility(noisy)[0].tolist() == noisy_kb
    as_uint8 = (noisy * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert jpeg_size_kb(list(as_uint8)) == noisy_kb
    with pytest.raises(ValueError, match="image 0"):
        jpeg_size_kb([np.zeros((4, 4), dtype=np.float32)])
    assert animal_prompt()[0] and animal_prompt()[1] == {}


# ---- logging, checkpoints, saving ----------------------------------------------------------------
def test_train_logs_checkpoints_and_resumes_exactly(tmp_path):
    kw = dict(num_epochs=3, save_freq=1, num_checkpoint_limit=5, per_prompt_stat_tracking=True,
              per_prompt_stat_tracking_min_count=2, train_num_inner_epochs=2)
    random.seed(1)
    full = _trainer(tmp_path, **kw)
    full.train()
    final = {k: v.clone() for k, v in full.unet.state_dict().items()}
    run = tmp_path / "run"
    per_epoch = full.config.optimizer_steps_per_epoch
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{per_epoch}", f"checkpoint-{2 * per_epoch}"]
    records = read_metrics(run)
    sampled = [r for r in records if "reward_mean" in r]
    trained = [r for r in records if "approx_kl" in r]
    assert [r["epoch"] for r in sampled] == [0, 1, 2] and len(trained) == 3 * per_epoch
    assert {"loss", "approx_kl", "clipfrac", "lr", "inner_epoch", "grad_norm"} <= trained[0].keys()
    assert [r["step"] for r in trained] == list(range(1, 3 * per_epoch + 1))
    # A run killed after epoch 2 resumes from its checkpoint and ends exactly where the full run did.
    random.seed(123)  # whatever the process did meanwhile: the checkpoint restores every random state
    resumed = _trainer(tmp_path, **{**kw, "resume_from": str(run / f"checkpoint-{2 * per_epoch}")})
    result = resumed.train()
    assert result["epochs"] == 1 and resumed.global_step == 3 * per_epoch
    for k, v in resumed.unet.state_dict().items():
        assert torch.equal(v, final[k]), k
    assert [r["reward_mean"] for r in read_metrics(run) if "reward_mean" in r] == [r["reward_mean"] for r in sampled]
    # The final save is the whole pipeline in diffusers format.
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(str(run))
    for k, v in loaded.unet.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_lora_checkpoint_resume_and_final_adapter_file(tmp_path):
    kw = dict(num_epochs=2, save_freq=1, use_lora=True, train_learning_rate=1e-2)
    full = _trainer(tmp_path, **kw)
    full.train()
    run = tmp_path / "run"
    assert (run / "pytorch_lora_weights.safetensors").exists() and not (run / "unet").exists()
    ckpt_dir = run / f"checkpoint-{full.config.optimizer_steps_per_epoch}"
    resumed = _trainer(tmp_path, **{**kw, "resume_from": True})
    assert resumed.train()["epochs"] == 1
    for k, v in resumed.unet.state_dict().items():
        assert torch.equal(v, full.unet.state_dict()[k]), k
    assert (ckpt_dir / "unet.safetensors").exists()
    # The saved adapters, loaded into a fresh copy of the pipeline, give the trained policy's images.
    pipe = tiny_diffusion_pipeline(32)
    pipe.load_lora_weights(str(run))
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor([500, 20]), torch.randn(2, 24, 32)
    with torch.no_grad():
        assert_close(pipe.unet(x, t, e).sample, full.unet(x, t, e).sample, 1e-5, "unet with loaded adapters")


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    trainer = _trainer(tmp_path, resume_from=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.train()


def test_a_new_run_into_a_used_output_dir_is_refused(tmp_path):
    _trainer(tmp_path, num_epochs=1).train()
    run = tmp_path / "run"
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with pytest.raises(CheckpointError, match="resume_from"):
        _trainer(tmp_path, num_epochs=1).train()
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert _trainer(tmp_path, num_epochs=1, overwrite_output_dir=True).train()["epochs"] == 1


def test_resume_refuses_a_checkpoint_past_the_last_epoch(tmp_path):
    _trainer(tmp_path, num_epochs=3, save_freq=1).train()
    latest = tmp_path / "run" / f"checkpoint-{2 * _config(tmp_path).optimizer_steps_per_epoch}"
    with pytest.raises(CheckpointError, match=latest.name):
        _trainer(tmp_path, num_epochs=1, resume_from=True).train()


def test_image_grid(tmp_path):
    images = torch.rand(6, 3, 8, 8)
    grid = image_grid(images, rows=2, scale=2)
    assert grid.size == (3 * 10 * 2, 2 * 10 * 2)
    assert json.dumps(list(grid.getpixel((0, 0)))) == "[255, 255, 255]"


def test_an_epochs_first_step_logs_zero_kl_clipfrac_and_loss_truly(tmp_path):
    """With one optimizer step per epoch the step trains the policy that sampled (every ratio is 1)
    on advantages normalised over exactly its samples: approx_kl, clipfrac and the loss are 0 while
    the gradient is not. A second optimizer step in the epoch moves them off 0."""
    one = _trainer(tmp_path, sample_batch_size=4, sample_num_batches_per_epoch=1, train_batch_size=4)
    assert one.config.optimizer_steps_per_epoch == 1
    one.step(0, 0)
    stats = one.last_stats
    assert stats["approx_kl"] == 0.0 and stats["clipfrac"] == 0.0 and abs(stats["loss"]) < 1e-6
    assert stats["grad_norm"] > 0
    two = _trainer(tmp_path, sample_batch_size=4, sample_num_batches_per_epoch=2, train_batch_size=4,
                   train_learning_rate=1e-2)
    assert two.config.optimizer_steps_per_epoch == 2
    two.step(0, 0)
    assert two.last_stats["approx_kl"] > 0  # the mean over the epoch's two steps: the second moved
