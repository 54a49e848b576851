"""The embedded demo: a built-in tiny model learns to sort digits, then DDPO trains a tiny diffusion
pipeline; on a CPU, in about a minute and a half.

Nothing is downloaded. The model (``fastalign/tiny-llama``, random weights) and the character
tokenizer are built locally; the task is ``fastalign.tasks.sort_digits``, measured on held-out
prompts by the fraction of greedy answers that are exactly sorted and by the mean graded
``sortedness_reward``. Five stages, each measured before and after:

    stage 1  SFT on (prompt, sorted digits) rows, completion-only loss, packed batches; kept short
             (40 steps) so the policy is far from saturated and DPO has something to improve
    stage 2  a reward model: the SFT model's body with a fresh scalar head, trained on preference
             pairs (the sorted answer against a flawed one: a swapped neighbour, a digit dropped,
             duplicated or replaced, the prompt echoed). It does not change the policy, so the
             task metric stays the SFT model's; its measure is the held-out pair accuracy (the
             fraction of unseen pairs whose chosen answer scores higher)
    stage 3  DPO from the SFT model (stage 2's reward model is not used: DPO needs none) on the
             same kind of pairs, against a frozen copy of the SFT model as the reference. Its pair
             accuracy is that of DPO's implicit reward, ``beta * log(pi / pi_ref)``, on the same
             held-out pairs (before DPO the policy is the reference, every implicit reward is 0)
    stage 4  PPO from the SFT model (not the DPO one: DPO sharpens greedy answers but its sampled
             answers score about 0.03, too little signal to start RL from), on sampled answers to
             the training prompts, rewarded by the task's graded ``sortedness_reward`` (the
             reward model of stage 2 ranks only about 70 % of pairs right: PPO would learn its
             mistakes), against a frozen copy of the SFT model, the KL kept near 3 nats per
             answer by the adaptive controller
    stage 5  GRPO from the SFT model, on groups of 8 sampled answers per training prompt, rewarded
             by the same graded ``sortedness_reward``: each answer's advantage is its reward against
             its group's (no value model), TRL's defaults otherwise (no KL term, so no reference
             model; the DAPO token-level loss)
    stage 6  DDPO on a tiny Stable Diffusion pipeline (random weights, built from configs: CLIP text
             encoder, VAE and UNet, ``fastalign.models.tiny.tiny_diffusion_pipeline``), the whole
             UNet trained toward JPEG compressibility (``fastalign.tasks.compressibility``, the
             DDPO paper's reward that needs no model). Measured on the same prompts and noise
             before and after: the mean reward (minus the JPEG size in kB); ``ddpo/before_after.png``
             shows those images, before above, after below. Skipped when diffusers is missing

The run directory gets one folder per stage (``sft/``, ``reward/``, ``dpo/``, ``ppo/``, ``grpo/``, ``ddpo/``: its
``metrics.jsonl``, PNG curves under ``plots/`` and the trained model in Hugging Face format;
``ppo/`` adds its value head), plus
``summary.json`` (the settings, one record per row of the table, with the reward model's accuracy
before training and DPO's mean implicit-reward margin, and the wall time) and ``results.md``
(the table).

The tiny model runs on one CPU thread by default (``DemoSettings.cpu_threads``): on a busy 2-core
machine two OpenMP threads that spin while waiting (the default unless ``OMP_WAIT_POLICY=PASSIVE``,
which ``make`` exports) made steps ten times slower; one thread is as fast or faster under load and
about 20 % slower on an idle machine.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastalign.algorithms import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)
from fastalign.algorithms.ppo import reward_function
from fastalign.engine.metrics import read_metrics
from fastalign.engine.plot import plot_run
from fastalign.models.tiny import char_tokenizer, tiny_model
from fastalign.tasks import sort_digits


@dataclass
class DemoSettings:
    """Tuned on a 2-core CPU (one thread): the whole demo takes about 80 s on a busy machine
    (training: SFT ~1-2 s, reward model ~4-8 s, DPO ~5-9 s, PPO ~30 s, DDPO ~22 s; greedy
    evaluation, sampling and plots add the rest).

    40 SFT steps lift the mean reward from about 0 to 0.55 (exactly sorted: about 0.02); DPO then
    lifts it to about 0.65-0.7 (exactly sorted: about 0.05-0.1). A longer SFT gets further on its
    own (600 steps: about 0.87 exactly sorted), but from about 150 SFT steps on (0.2-0.3 exactly
    sorted) DPO on these offline pairs adds nothing measurable, so SFT stays short. The reward
    model reaches about 0.7 held-out pair accuracy (it scores a whole answer from its last token,
    which is hard for a 2-layer model on near misses); DPO's implicit reward about 0.85-0.9. DPO's
    learning rate and beta are far above TRL's defaults (1e-6, 0.1), which suit large models.
    PPO (150 steps of 64 sampled answers) lifts the sampled answers' mean reward from about 0.14
    to 0.5 and the greedy one to about 0.63-0.67 (exactly sorted about 0.05-0.09), at a KL of
    about 3 nats to the SFT model; its learning rate is again far above TRL's 1.41e-5. GRPO (150
    steps of 8 prompts x 8 sampled answers, ~15-20 s) lifts the sampled answers' mean reward from
    about 0.19 to 0.6-0.68 and the greedy one to about 0.66-0.73 (exactly sorted 0.075-0.125; seeds
    0-2), at a learning rate far above TRL's 1e-6 (at 2e-3 it swung with the seed, some runs below
    the SFT model's greedy answers). DDPO (12
    epochs of 16 images, 8 DDIM steps, no guidance, one optimizer step per epoch over the whole
    UNet at 1e-2) lifts the compressibility of 16 fixed images from about -4.2 to -2.7 kB; LoRA on
    the tiny UNet's few attention layers moved it by under 0.1 kB in 10 epochs at 3e-2."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    train_rows: int = 40_000
    eval_rows: int = 200
    pair_rows: int = 6000
    eval_pairs: int = 200
    sft_learning_rate: float = 3e-3
    sft_steps: int = 40
    sft_warmup_ratio: float = 0.05
    reward_learning_rate: float = 1e-3
    reward_steps: int = 400
    dpo_learning_rate: float = 1e-3
    dpo_steps: int = 300
    dpo_beta: float = 0.5
    ppo_learning_rate: float = 1e-3
    ppo_steps: int = 150
    ppo_batch_size: int = 64
    ppo_mini_batch_size: int = 16
    ppo_init_kl_coef: float = 0.05
    ppo_target_kl: float = 3.0  # nats per answer, summed over its tokens
    ppo_horizon: float = 500.0
    ppo_prompts: int = 5000
    grpo_learning_rate: float = 1e-3
    grpo_steps: int = 150
    grpo_prompts_per_step: int = 8
    grpo_generations: int = 8  # sampled answers per prompt: the group
    ddpo: bool = True  # stage 5 (needs diffusers)
    ddpo_epochs: int = 12
    ddpo_learning_rate: float = 1e-2
    ddpo_sample_batches: int = 2  # of 8 images per epoch; one optimizer step per epoch
    ddpo_sampling_steps: int = 8
    ddpo_eval_images: int = 16
    warmup_ratio: float = 0.1  # reward model and DPO
    max_tokens_per_batch: int = 512
    cpu_threads: int | None = 1  # torch threads off GPU for the demo's duration; None: leave as is
    seed: int = 0


def _row(stage: str, metrics: dict, seconds: float | None, pair_accuracy: float | None = None, **extra) -> dict:
    return {"stage": stage, **metrics, "pair_accuracy": pair_accuracy, "train_seconds": seconds, **extra}


def _table(rows: list[dict]) -> str:
    lines = ["| stage | exact sorted | mean reward | held-out pair accuracy | train seconds |", "|---|---|---|---|---|"]
    for r in rows:
        seconds = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        accuracy = "-" if r["pair_accuracy"] is None else f"{r['pair_accuracy']:.3f}"
        lines.append(f"| {r['stage']} | {r['exact_sorted']:.3f} | {r['reward_mean']:.3f} | {accuracy} | {seconds} |")
    return "\n".join(lines)


NOTE = ("Exact sorted and mean reward: greedy answers to held-out prompts (the reward model does not "
        "change the policy). Held-out pair accuracy: the fraction of unseen (sorted, flawed) answer pairs "
        "whose sorted answer scores higher, by the reward model's score or by DPO's implicit reward "
        "beta * log(pi / pi_ref). PPO and GRPO start from the SFT model, not the DPO one.")


def run_demo(output_dir="runs/demo", settings: DemoSettings | None = None) -> dict:
    settings = settings or DemoSettings()
    threads = torch.get_num_threads()
    if settings.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(settings.cpu_threads)
    try:
        return _run(Path(output_dir), settings)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, settings: DemoSettings) -> dict:
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    s = settings
    tokenizer = char_tokenizer()
    model = tiny_model("llama", hidden_size=s.hidden_size, layers=s.layers, heads=s.heads, seed=s.seed)
    train_rows = sort_digits.make_rows(s.train_rows, seed=s.seed + 1000)
    train_prompts = {r["prompt"] for r in train_rows}
    eval_rows = sort_digits.make_rows(s.eval_rows, seed=s.seed + 1, exclude=train_prompts)
    # Preference pairs never ask a held-out prompt; held-out pairs ask no prompt trained on.
    pairs = sort_digits.make_preference_pairs(s.pair_rows, seed=s.seed + 2000,
                                              exclude={r["prompt"] for r in eval_rows})
    eval_pairs = sort_digits.make_preference_pairs(s.eval_pairs, seed=s.seed + 3000,
                                                   exclude=train_prompts | {p["prompt"] for p in pairs})
    print(f"fastalign demo: tiny Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
          f"{len(train_rows)} SFT rows, {len(pairs)} preference pairs, {len(eval_rows)} held-out prompts and "
          f"{len(eval_pairs)} held-out pairs, run dir {out}")
    results = [_row("before training (random init)", sort_digits.evaluate(model, tokenizer, eval_rows), None)]
    # The demo's run dir is its own: a rerun starts every stage anew (overwrite_output_dir).
    common = {"seed": s.seed, "lr_scheduler_type": "cosine", "max_tokens_per_batch": s.max_tokens_per_batch,
              "logging_steps": 10, "overwrite_output_dir": True}

    # Stage 1: SFT.
    sft_args = SFTConfig(output_dir=str(out / "sft"), learning_rate=s.sft_learning_rate, max_steps=s.sft_steps,
                         warmup_ratio=s.sft_warmup_ratio, eval_steps=max(1, s.sft_steps // 4), **common)
    trainer = SFTTrainer(model, args=sft_args, train_dataset=train_rows, eval_dataset=eval_rows, tokenizer=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    results.append(_row("after SFT", sort_digits.evaluate(model, tokenizer, eval_rows), time.perf_counter() - t0))
    sft_model = copy.deepcopy(model)  # PPO's starting point (DPO trains ``model`` in place)
    grpo_model = copy.deepcopy(model)  # GRPO's (PPO trains ``sft_model`` in place)
    plot_run(out / "sft")

    # Stage 2: a reward model on the SFT model's body (a copy: the policy is not touched).
    reward_args = RewardConfig(output_dir=str(out / "reward"), learning_rate=s.reward_learning_rate,
                               max_steps=s.reward_steps, warmup_ratio=s.warmup_ratio,
                               eval_steps=max(1, s.reward_steps // 4), **common)
    reward = RewardTrainer(model, args=reward_args, train_dataset=pairs, eval_dataset=eval_pairs, tokenizer=tokenizer)
    reward_before = reward.evaluate()["eval/accuracy"]
    t0 = time.perf_counter()
    reward_after = reward.train()["eval/accuracy"]
    seconds = time.perf_counter() - t0
    print(f"fastalign demo: reward model held-out pair accuracy {reward_before:.3f} (fresh head) -> {reward_after:.3f}")
    results.append(_row("after reward model (policy unchanged)", sort_digits.evaluate(model, tokenizer, eval_rows),
                        seconds, reward_after, pair_accuracy_before=reward_before))
    plot_run(out / "reward")
    del reward

    # Stage 3: DPO from the SFT model; the reference is a frozen copy of it (DPOTrainer's default).
    dpo_args = DPOConfig(output_dir=str(out / "dpo"), learning_rate=s.dpo_learning_rate, max_steps=s.dpo_steps,
                         beta=s.dpo_beta, warmup_ratio=s.warmup_ratio, eval_steps=max(1, s.dpo_steps // 4), **common)
    dpo = DPOTrainer(model, args=dpo_args, train_dataset=pairs, eval_dataset=eval_pairs, tokenizer=tokenizer)
    t0 = time.perf_counter()
    dpo_metrics = dpo.train()
    seconds = time.perf_counter() - t0
    results.append(_row("after DPO", sort_digits.evaluate(model, tokenizer, eval_rows), seconds,
                        dpo_metrics["eval/rewards/accuracies"], reward_margin=dpo_metrics["eval/rewards/margins"]))
    plot_run(out / "dpo")
    del dpo

    # Stage 4: PPO from the SFT model, rewarded by the task's own graded sortedness of sampled answers.
    ppo_args = PPOConfig(output_dir=str(out / "ppo"), learning_rate=s.ppo_learning_rate, max_steps=s.ppo_steps,
                         batch_size=s.ppo_batch_size, mini_batch_size=s.ppo_mini_batch_size,
                         init_kl_coef=s.ppo_init_kl_coef, target=s.ppo_target_kl, horizon=s.ppo_horizon, seed=s.seed,
                         max_tokens_per_batch=4 * s.max_tokens_per_batch, logging_steps=1, overwrite_output_dir=True)
    prompts = [{"query": r["prompt"]} for r in train_rows[:s.ppo_prompts]]
    ppo = PPOTrainer(ppo_args, sft_model, tokenizer=tokenizer, dataset=prompts)
    max_new = sort_digits.MAX_DIGITS + 1
    t0 = time.perf_counter()
    ppo_metrics = ppo.train(reward_function("sort_digits"), {"max_new_tokens": max_new})
    seconds = time.perf_counter() - t0
    first = read_metrics(out / "ppo")[0]
    results.append(_row("after PPO (from the SFT model)", sort_digits.evaluate(sft_model, tokenizer, eval_rows), seconds,
                        sampled_reward_first=first["env/reward_mean"], sampled_reward_last=ppo_metrics["env/reward_mean"],
                        kl_last=ppo_metrics["objective/kl"]))
    print(f"fastalign demo: PPO mean reward of sampled answers {first['env/reward_mean']:.3f} (step 1) -> "
          f"{ppo_metrics['env/reward_mean']:.3f} (step {s.ppo_steps}), KL to the SFT model "
          f"{ppo_metrics['objective/kl']:.2f} (target {s.ppo_target_kl})")
    plot_run(out / "ppo")
    del ppo

    # Stage 5: GRPO from the SFT model, groups of sampled answers rewarded by the task's sortedness.
    results.append(_grpo_stage(out, s, grpo_model, tokenizer, train_rows, eval_rows))

    # Stage 6: DDPO on a tiny diffusion pipeline (a separate model and task).
    ddpo = _ddpo_stage(out, s) if s.ddpo else None

    table = _table(results)
    if ddpo is not None:
        table += ("\n\nDDPO, tiny Stable Diffusion toward JPEG compressibility (reward: minus the JPEG size in kB, "
                  f"mean over {ddpo['images']} fixed prompts and seeds):\n\n| stage | reward | train seconds |\n"
                  f"|---|---|---|\n| before DDPO | {ddpo['reward_before']:.3f} | - |\n"
                  f"| after DDPO ({ddpo['epochs']} epochs) | {ddpo['reward_after']:.3f} | {ddpo['train_seconds']:.0f} |")
    wall = time.perf_counter() - began
    print("\n" + table + "\n\n" + NOTE + f"\n\nwall time {wall:.0f} s\n")
    summary = {"settings": asdict(s), "stages": results, "ddpo": ddpo, "wall_seconds": wall}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(
        f"# fastalign demo: sorting digits, and DDPO\n\n{table}\n\n{NOTE}\n\nWall time: {wall:.0f} s.\n")
    print(f"fastalign demo: metrics, plots and models under {out}/")
    return summary


def _grpo_stage(out: Path, s: DemoSettings, model, tokenizer, train_rows: list[dict], eval_rows: list[dict]) -> dict:
    """Stage 5: GRPO; the table's row, with the sampled answers' mean reward over the first and the
    last 5 steps."""
    config = GRPOConfig(output_dir=str(out / "grpo"), learning_rate=s.grpo_learning_rate, max_steps=s.grpo_steps,
                        per_device_train_batch_size=s.grpo_prompts_per_step * s.grpo_generations,
                        num_generations=s.grpo_generations, max_completion_length=sort_digits.MAX_DIGITS + 1,
                        lr_scheduler_type="constant", seed=s.seed, max_tokens_per_batch=4 * s.max_tokens_per_batch,
                        logging_steps=1, overwrite_output_dir=True)
    prompts = [{"prompt": r["prompt"]} for r in train_rows[:s.ppo_prompts]]
    trainer = GRPOTrainer(model, "sort_digits", args=config, train_dataset=prompts, processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    rewards = [r["reward"] for r in read_metrics(out / "grpo") if "reward" in r]
    first, last = sum(rewards[:5]) / len(rewards[:5]), sum(rewards[-5:]) / len(rewards[-5:])
    print(f"fastalign demo: GRPO mean reward of sampled answers {first:.3f} (first 5 steps) -> {last:.3f} (last 5 "
          f"of {s.grpo_steps}), groups of {s.grpo_generations}")
    plot_run(out / "grpo")
    return _row("after GRPO (from the SFT model)", sort_digits.evaluate(model, tokenizer, eval_rows), seconds,
                sampled_reward_first=first, sampled_reward_last=last)


def _ddpo_stage(out: Path, s: DemoSettings) -> dict | None:
    """Stage 6: DDPO toward JPEG compressibility; the mean reward on fixed prompts and noise before
    and after, and the images of both as one PNG."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("fastalign demo: DDPO stage skipped (pip install 'fastalign[diffusion]' for diffusers)")
        return None
    from fastalign.algorithms.ddpo import DDPOConfig, DDPOTrainer, image_grid
    from fastalign.models.tiny import tiny_diffusion_pipeline
    from fastalign.tasks.compressibility import ANIMALS, animal_prompt, jpeg_compressibility

    config = DDPOConfig(
        output_dir=str(out / "ddpo"), seed=s.seed, num_epochs=s.ddpo_epochs, save_freq=s.ddpo_epochs,
        mixed_precision="no", use_lora=False, sample_num_steps=s.ddpo_sampling_steps, sample_guidance_scale=1.0,
        sample_batch_size=8, sample_num_batches_per_epoch=s.ddpo_sample_batches, train_batch_size=8,
        train_gradient_accumulation_steps=s.ddpo_sample_batches, train_learning_rate=s.ddpo_learning_rate,
        overwrite_output_dir=True,
    )
    trainer = DDPOTrainer(config, jpeg_compressibility, animal_prompt, tiny_diffusion_pipeline(64, seed=s.seed))
    prompts = [ANIMALS[i % len(ANIMALS)] for i in range(s.ddpo_eval_images)]
    before = trainer.generate(prompts, seed=s.seed + 1)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    after = trainer.generate(prompts, seed=s.seed + 1)
    shown = min(8, len(prompts))
    image_grid(torch.cat([before[:shown], after[:shown]]), rows=2, scale=3).save(out / "ddpo" / "before_after.png")
    plot_run(out / "ddpo")
    result = {"reward_before": float(jpeg_compressibility(before)[0].mean()),
              "reward_after": float(jpeg_compressibility(after)[0].mean()), "train_seconds": seconds,
              "epochs": s.ddpo_epochs, "images": len(prompts)}
    print(f"fastalign demo: DDPO JPEG compressibility (minus kB, {len(prompts)} fixed prompts and seeds) "
          f"{result['reward_before']:.3f} -> {result['reward_after']:.3f} in {seconds:.0f} s; "
          f"images in {out / 'ddpo' / 'before_after.png'}")
    return result
