"""``DDPOTrainer``: sampling epochs of a Stable Diffusion pipeline with DDIM log-probabilities, then
the clipped DDPO loss per recorded timestep (the algorithm and its options: the package docstring)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
import warnings
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed

from fastalign.engine import TrainingConfig, distributed
from fastalign.engine import checkpoint as ckpt
from fastalign.engine.checkpoint import Checkpointed, Checkpointer
from fastalign.engine.engine import Engine, default_device
from fastalign.engine.loop import Cadence, Loop
from fastalign.errors import ConfigError
from fastalign.kernels.ddpo import ddim_step_with_logprob, ddpo_loss
from fastalign.kernels.rl import PerPromptStatTracker

from .config import PRECISIONS, DDPOConfig
from .launch import DDPO_KEYS, launch_ddpo
from .pipeline import load_pipeline, place
from .weights import unet_weights

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_FILE = "pytorch_lora_weights.safetensors"
BAR_KEYS = ("reward_mean", "approx_kl", "clipfrac")
# Each sample's tensors, indexed [sample, ...]; the per-timestep ones are [sample, step, ...].
PER_STEP = ("timesteps", "latents", "next_latents", "log_probs")


class DDPOTrainer(Checkpointed):
    """DDPO on a Stable Diffusion pipeline (TRL 0.7.10's interface).

    ``reward_function(images, prompts, metadata) -> (rewards, reward_metadata)`` (or just the
    rewards): ``images`` a float tensor ``[B, 3, H, W]`` in ``[0, 1]``, one reward per image.
    ``prompt_function() -> (prompt, metadata)``. ``sd_pipeline``: a diffusers
    ``StableDiffusionPipeline``, a name or path to load one from, or ``"fastalign/tiny-sd"`` (the
    built-in tiny pipeline, random weights, nothing downloaded). ``image_samples_hook(
    prompt_image_data, global_step, logger)``, if given, is called once per epoch with
    ``[[images, prompts, metadata, rewards, reward_metadata]]`` of the epoch's last sampled batch.
    """

    run_keys = DDPO_KEYS
    launch = classmethod(launch_ddpo)

    def __init__(self, config: DDPOConfig | None = None, reward_function=None, prompt_function=None,
                 sd_pipeline=None, image_samples_hook=None):
        if reward_function is None or prompt_function is None or sd_pipeline is None:
            raise ValueError("DDPOTrainer needs a reward_function, a prompt_function and an sd_pipeline")
        if distributed.world_size() > 1:
            raise NotImplementedError("DDPOTrainer runs on one process; launch it without torchrun/deepspeed")
        self.config = c = config or DDPOConfig()
        set_seed(c.seed)
        self.reward_fn, self.prompt_fn, self.image_samples_hook = reward_function, prompt_function, image_samples_hook
        self.pipeline = pipe = load_pipeline(sd_pipeline)
        self.device = device = default_device()  # the Engine's
        if c.allow_tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        precision = c.mixed_precision
        if precision == "fp16" and device.type != "cuda":
            warnings.warn("mixed_precision='fp16' needs CUDA; running in fp32 on the CPU", stacklevel=2)
            precision = "no"
        self.precision = PRECISIONS[precision]
        frozen_dtype = self.precision or torch.float32
        for part in (pipe.vae, pipe.text_encoder):
            place(part.requires_grad_(False).eval(), device, frozen_dtype)
        unet = pipe.unet
        if c.use_lora:
            from peft import LoraConfig

            place(unet.requires_grad_(False), device, frozen_dtype)
            unet.add_adapter(LoraConfig(r=c.lora_rank, lora_alpha=c.lora_rank, init_lora_weights="gaussian",
                                        target_modules=LORA_TARGETS))
            for p in unet.parameters():  # the adapters train in fp32
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            unet.requires_grad_(True).float()
        self.unet = unet
        self.trainable = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.trainable, lr=c.train_learning_rate, betas=(c.train_adam_beta1, c.train_adam_beta2),
                                      weight_decay=c.train_adam_weight_decay, eps=c.train_adam_epsilon)
        # The engine's options in its own terms: clipping, fp32 weights, a constant learning rate.
        options = TrainingConfig(learning_rate=c.train_learning_rate, max_grad_norm=c.train_max_grad_norm)
        self.engine = Engine(unet, options, None, optimizer)
        self.optimizer = self.engine.optimizer
        self.checkpointer = Checkpointer(self.engine, c.output_dir, unet_weights(unet, c.use_lora), self.extra_state,
                                         self.load_extra_state, c.num_checkpoint_limit,
                                         overwrite=c.overwrite_output_dir, resume_key="resume_from")
        self.stat_tracker = (PerPromptStatTracker(c.per_prompt_stat_tracking_buffer_size, c.per_prompt_stat_tracking_min_count)
                             if c.per_prompt_stat_tracking else None)
        self.generator = torch.Generator(self.device).manual_seed(c.seed)  # sampling noise
        self.perm_generator = torch.Generator().manual_seed(c.seed + 1)  # shuffles
        self.executor = concurrent.futures.ThreadPoolExecutor(c.max_workers) if c.async_reward_computation else None
        self.first_epoch = self.global_step = 0
        self.logger = None
        with torch.no_grad():
            self.negative_embeds = self._encode([c.negative_prompts])

    # ---- sampling ------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)

    def _encode(self, prompts) -> torch.Tensor:
        tok = self.pipeline.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return self.pipeline.text_encoder(ids)[0]

    @property
    def guided(self) -> bool:
        """Whether sampling and training both use classifier-free guidance (at scale 1 it is the
        conditional prediction itself, so it is skipped)."""
        return self.config.train_cfg and self.config.sample_guidance_scale != 1.0

    def _unet(self, latents, timesteps, embeds, negative) -> torch.Tensor:
        """The UNet's noise prediction; when ``guided``, the unconditional and conditional ones
        in one batch, combined as ``uncond + scale x (cond - uncond)``."""
        if not self.guided:
            return self.unet(latents, timesteps, embeds).sample
        out = self.unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                        torch.cat([negative, embeds])).sample
        uncond, cond = out.chunk(2)
        return uncond + self.config.sample_guidance_scale * (cond - uncond)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str]) -> tuple[dict, torch.Tensor]:
        """Denoise one batch of prompts: the recorded trajectory (a dict of ``[B, ...]`` tensors)
        and the decoded images ``[B, 3, H, W]`` in ``[0, 1]``."""
        c, pipe = self.config, self.pipeline
        self.unet.eval()
        scheduler = pipe.scheduler
        scheduler.set_timesteps(c.sample_num_steps, device=self.device)
        n = len(prompts)
        with self._autocast():
            embeds = self._encode(prompts)
        negative = self.negative_embeds.expand(n, -1, -1)
        size = pipe.unet.config.sample_size
        latents = torch.randn((n, pipe.unet.config.in_channels, size, size), generator=self.generator,
                              device=self.device) * scheduler.init_noise_sigma
        trajectory, log_probs = [latents], []
        for t in scheduler.timesteps:
            step_t = torch.full((n,), int(t), device=self.device, dtype=torch.long)
            with self._autocast():
                noise = self._unet(scheduler.scale_model_input(latents, t), step_t, embeds, negative)
            latents, log_prob = ddim_step_with_logprob(scheduler, noise.float(), step_t, latents, eta=c.sample_eta,
                                                       generator=self.generator)
            trajectory.append(latents)
            log_probs.append(log_prob)
        with self._autocast():
            images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        trajectory = torch.stack(trajectory, dim=1)  # [B, steps + 1, C, h, w]
        samples = {
            "prompt_embeds": embeds, "negative_prompt_embeds": negative,
            "timesteps": scheduler.timesteps.to(self.device).long().repeat(n, 1),
            "latents": trajectory[:, :-1], "next_latents": trajectory[:, 1:],
            "log_probs": torch.stack(log_probs, dim=1),
        }
        return samples, images

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seed: int = 0) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` for ``prompts``, sampled as in training but from
        their own seeded noise (the training run's sampling is left untouched): a fixed set of
        prompts and a seed compare a policy before and after training."""
        own, self.generator = self.generator, torch.Generator(self.device).manual_seed(seed)
        try:
            return self.sample(list(prompts))[1].cpu()
        finally:
            self.generator = own

    def _rewards(self, images, prompts, metadata):
        out = self.reward_fn(images, list(prompts), list(metadata))
        rewards, reward_metadata = out if isinstance(out, tuple) else (out, {})
        if isinstance(rewards, torch.Tensor):
            rewards = rewards.detach().cpu()
        rewards = torch.as_tensor(np.asarray(rewards, dtype=np.float64)).flatten()
        if rewards.numel() != len(prompts):
            raise ConfigError(f"reward_function returned {rewards.numel()} rewards for {len(prompts)} images (one each)")
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        if bad:
            raise ConfigError(f"reward_function returned a non-finite reward for image {bad[0]} "
                             f"(prompt {prompts[bad[0]]!r}): {rewards[bad[0]].item()}")
        return rewards, reward_metadata

    def _sample_epoch(self):
        """Every batch of the epoch: samples concatenated, rewards, and the last batch's images."""
        c = self.config
        batches, pending = [], []
        for _ in range(c.sample_num_batches_per_epoch):
            drawn = [self.prompt_fn() for _ in range(c.sample_batch_size)]
            prompts = [p for p, _ in drawn]
            metadata = [m for _, m in drawn]
            samples, images = self.sample(prompts)
            images = images.cpu()
            if self.executor is not None:
                pending.append(self.executor.submit(self._rewards, images, prompts, metadata))
            else:
                pending.append(self._rewards(images, prompts, metadata))
            batches.append((samples, images, prompts, metadata))
        results = [r.result() if isinstance(r, concurrent.futures.Future) else r for r in pending]
        samples = {k: torch.cat([b[0][k] for b in batches]) for k in batches[0][0]}
        rewards = torch.cat([r for r, _ in results])
        prompts = [p for b in batches for p in b[2]]
        return samples, rewards, prompts, [*batches[-1][1:], *results[-1]]

    def _advantages(self, rewards: torch.Tensor, prompts) -> torch.Tensor:
        if self.stat_tracker is not None:
            return torch.as_tensor(self.stat_tracker.update(np.asarray(prompts), rewards.numpy()))
        r = rewards.numpy()
        return torch.as_tensor((r - r.mean()) / (r.std() + 1e-8))

    # ---- training ------------------------------------------------------------------------------
    def _step_loss(self, batch: dict, j: int):
        """The clipped loss of timestep ``j`` of a batch, with approx_kl and clipfrac."""
        c = self.config
        with self._autocast():
            noise = self._unet(batch["latents"][:, j], batch["timesteps"][:, j], batch["prompt_embeds"],
                               batch["negative_prompt_embeds"])
        _, log_prob = ddim_step_with_logprob(self.pipeline.scheduler, noise.float(), batch["timesteps"][:, j],
                                             batch["latents"][:, j], eta=c.sample_eta,
                                             prev_sample=batch["next_latents"][:, j])
        log_ratio = log_prob - batch["log_probs"][:, j]
        ratio = log_ratio.exp()
        loss = ddpo_loss(batch["advantages"], ratio, c.train_clip_range, c.train_adv_clip_max)
        approx_kl = 0.5 * (log_ratio.detach() ** 2).mean()
        clipfrac = ((ratio.detach() - 1).abs() > c.train_clip_range).float().mean()
        return loss, approx_kl, clipfrac

    def _shuffled(self, samples: dict) -> dict:
        """Samples in a random order, each one's timesteps in their own random order."""
        n, steps = samples["timesteps"].shape
        order = torch.randperm(n, generator=self.perm_generator).to(self.device)
        out = {k: v[order] for k, v in samples.items()}
        perms = torch.stack([torch.randperm(steps, generator=self.perm_generator) for _ in range(n)]).to(self.device)
        rows = torch.arange(n, device=self.device)[:, None]
        for key in PER_STEP:
            out[key] = out[key][rows, perms]
        return out

    def _train_epoch(self, samples: dict, epoch: int) -> list[dict]:
        c = self.config
        per_step = c.train_gradient_accumulation_steps * c.num_train_timesteps
        records = []
        for inner in range(c.train_num_inner_epochs):
            shuffled = self._shuffled(samples)
            self.unet.train()
            stats = []  # [loss, approx_kl, clipfrac] of each timestep of the optimizer step
            # DDPOConfig's checks make every optimizer step whole: an epoch's samples are a multiple of one.
            for b, start in enumerate(range(0, c.samples_per_epoch, c.train_batch_size), start=1):
                batch = {k: v[start:start + c.train_batch_size] for k, v in shuffled.items()}
                ends_step = b % c.train_gradient_accumulation_steps == 0
                for j in range(c.num_train_timesteps):
                    loss, approx_kl, clipfrac = self._step_loss(batch, j)
                    self.engine.accumulate(loss / per_step, last=ends_step and j == c.num_train_timesteps - 1)
                    stats.append(torch.stack([loss.detach(), approx_kl, clipfrac]))
                if ends_step:
                    grad_norm = self.engine.step()
                    self.global_step += 1
                    means = (torch.stack(stats).double().sum(0) / per_step).tolist()  # one device sync per step
                    records.append({**dict(zip(("loss", "approx_kl", "clipfrac"), means)), "grad_norm": grad_norm,
                                    "lr": self.engine.lr, "epoch": epoch, "inner_epoch": inner})
                    stats = []
        return records

    def _epoch(self, epoch: int) -> list[dict]:
        """One epoch from ``global_step``: sample, score, train; its optimizer steps' records (the
        epoch's sampling statistics with the first)."""
        t0 = time.perf_counter()
        samples, rewards, prompts, last = self._sample_epoch()
        t1 = time.perf_counter()
        samples["advantages"] = self._advantages(rewards, prompts).to(self.device, torch.float32)
        sampled = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
                   "epoch": epoch, "time/sampling": t1 - t0}
        if self.image_samples_hook is not None:
            self.image_samples_hook([last], self.global_step, self.logger)
        records = self._train_epoch(samples, epoch)
        records[0] = {**sampled, **records[0]}
        self.last_stats = {**sampled, **_mean(records), "time/training": time.perf_counter() - t1}
        return records

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch (TRL's call): sample, score, train. Returns the global (optimizer) step after it;
        ``last_stats`` holds the epoch's statistics."""
        self.global_step = global_step
        self._epoch(epoch)
        return self.global_step

    def train(self, epochs: int | None = None) -> dict:
        """Run ``epochs`` (default ``num_epochs``) epochs, checkpointing every ``save_freq``, then
        save the trained weights to ``output_dir``. Returns the last epoch's statistics."""
        c = self.config
        total = epochs if epochs is not None else c.num_epochs
        self.checkpointer.total = total * c.optimizer_steps_per_epoch
        self.start_run(c.resume_from)
        start = self.first_epoch if c.resume_from else 0
        loop = Loop(c.output_dir, total, start, report_to=c.report_to, show_bar=not c.disable_tqdm,
                    keep_records_to=start * c.optimizer_steps_per_epoch, bar_keys=BAR_KEYS, bar_desc="ddpo epochs",
                    bar_unit="epoch", device=self.engine.device, resume_key="resume_from")
        self.logger = loop.logger
        began, self.last_stats = time.perf_counter(), {}

        def epoch_records(epoch: int) -> list[tuple[int, dict]]:
            first = self.global_step + 1
            records = self._epoch(epoch)
            self.first_epoch = epoch + 1
            return list(enumerate(records, start=first))

        try:
            loop.run(epoch_records, Cadence(save_steps=c.save_freq, save_last=False), save=self.save_checkpoint,
                     finish=lambda: self.save_model(c.output_dir), shown=lambda: self.last_stats)
        finally:
            self.logger = None
        return {**self.last_stats, "train_runtime": time.perf_counter() - began, "epochs": total - start}

    # ---- saving and checkpoints ----------------------------------------------------------------
    def save_model(self, output_dir: str | Path) -> None:
        """The pipeline in diffusers format, or with LoRA only the adapters (``pytorch_lora_weights
        .safetensors``, loaded by ``pipeline.load_lora_weights``)."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with ckpt.quiet_transformers():
            if self.config.use_lora:
                from diffusers.utils import convert_state_dict_to_diffusers
                from peft import get_peft_model_state_dict

                layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
                type(self.pipeline).save_lora_weights(str(output_dir), unet_lora_layers=layers, safe_serialization=True)
            else:
                self.pipeline.save_pretrained(str(output_dir), safe_serialization=True)

    def extra_state(self) -> dict:
        tracker = None
        if self.stat_tracker is not None:  # plain strings and floats, not numpy's
            tracker = {str(k): [float(r) for r in v] for k, v in self.stat_tracker.stats.items()}
        return {"ddpo": {"epoch": self.first_epoch, "tracker": tracker, "generator": self.generator.get_state(),
                         "perm": self.perm_generator.get_state()}}

    def load_extra_state(self, state: dict) -> None:
        ddpo = state["ddpo"]
        self.first_epoch = ddpo["epoch"]
        if self.stat_tracker is not None and ddpo["tracker"] is not None:
            size = self.stat_tracker.buffer_size
            self.stat_tracker.stats = {k: deque(v, maxlen=size) for k, v in ddpo["tracker"].items()}
        self.generator.set_state(ddpo["generator"])
        self.perm_generator.set_state(ddpo["perm"])


def _mean(records: list[dict]) -> dict:
    """An epoch's optimizer steps summarised (every epoch has at least one)."""
    means = {k: float(np.mean([r[k] for r in records])) for k in ("loss", "approx_kl", "clipfrac", "grad_norm")}
    return {**means, "lr": records[-1]["lr"]}
