"""``PPOTrainer``: TRL 0.7.10's interface (``generate``, ``step``) and ``train()`` over a data set of
prompts, on the packed core. The step's parts live beside it: options (``config``), the reference
(``reference``), generation, the rollout record, input checks, statistics."""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from transformers import set_seed

from fastalign.data import IGNORE_INDEX, Sequence, load_rows
from fastalign.data.prompts import tokenize_prompts
from fastalign.engine import Engine, distributed
from fastalign.engine.checkpoint import Checkpointed, Checkpointer, hf_weights
from fastalign.engine.engine import planned_zero_stage
from fastalign.engine.loop import Cadence, Loop, last_window
from fastalign.engine.metrics import peak_memory_gb
from fastalign.errors import ConfigError
from fastalign.kernels.gae import compute_advantages
from fastalign.kernels.ppo import ppo_loss
from fastalign.kernels.rl import AdaptiveKLController, FixedKLController, RunningMoments, masked_whiten
from fastalign.kernels.shaping import compute_rewards_packed
from fastalign.models import (
    CausalLMWithValueHead,
    eval_mode,
    load_model,
    load_reward_model,
    packed_scores,
    prepare_model,
)
from fastalign.models.loading import check_shared_tokens

from .config import PPOConfig
from .forwards import PACKED, forwards_for
from .generation import generate_responses, whole_model
from .inputs import check_step_inputs
from .launch import PPO_KEYS, launch_ppo
from .prompts import check_prompt_lengths, dict_of_lists, endless, prompt_loader
from .reference import create_reference_model
from .rollout import Forward, Rollout, RolloutLayout, Stopwatch, full_kl
from .stats import BAR_KEYS, SCALAR_ARRAYS, step_stats


class PPOTrainer(Checkpointed):
    """PPO on a causal LM with a value head, TRL 0.7.10's interface (``generate``, ``step``) plus
    ``train()`` over a dataset of prompts with a reward function or a reward model.

    ``model``: a ``CausalLMWithValueHead``, a causal LM (a value head is added) or a name or path;
    or an encoder-decoder LM (T5, BART; ``Seq2SeqLMWithValueHead``), run padded (``forwards``).
    The reference: ``ref_model`` if given; with PEFT adapters on the model and no ``ref_model``,
    the model with its adapters disabled; otherwise a frozen copy, sharing the policy's bottom
    ``num_shared_layers`` layers (frozen) when set. ``dataset``: rows with a ``query`` (or
    ``prompt``) text and/or ``input_ids`` (or HH-RLHF rows: the ``chosen`` dialogue up to its last
    assistant turn); ``self.dataloader`` yields ``batch_size`` of them at a
    time (``data_collator`` collates, by default into a dict of lists). ``optimizer``: default
    AdamW at ``learning_rate``; ``lr_scheduler``, if given, steps once per PPO step (as in TRL).
    ``reward_model`` (a RewardTrainer's model, a name or path) scores packed query+response
    sequences in ``train()`` when no ``reward_fn`` is given; it must share the policy's tokenizer.

    ``global_step`` counts the PPO steps done, every ``step()`` call whether by hand or from
    ``train()`` (``current_step``, TRL's name, is the same counter): a checkpoint is named after
    it, and a run resumed from that checkpoint, like ``train()`` on this trainer, goes on from it.
    """

    model_loader = staticmethod(load_model)
    peft_task_type = "CAUSAL_LM"
    run_keys = PPO_KEYS
    launch = classmethod(launch_ppo)

    def __init__(self, config: PPOConfig | None = None, model=None, ref_model=None, tokenizer=None, dataset=None,
                 optimizer=None, data_collator=None, num_shared_layers=None, lr_scheduler=None, *,
                 peft_config=None, reward_model=None):
        if model is None:
            raise ValueError("PPOTrainer needs a model (a CausalLMWithValueHead, a causal LM, or a name or path)")
        self.config = self.args = config = config or PPOConfig()
        set_seed(config.seed)
        wrapped = isinstance(model, CausalLMWithValueHead)
        lm, tokenizer, self.attention = prepare_model(model.pretrained_model if wrapped else model, tokenizer,
                                                      peft_config, load_model)
        self.forwards = forwards_for(lm)  # packed, or padded for an encoder-decoder model
        if wrapped:
            model.pretrained_model = lm
        else:
            model = self.forwards.value_model(lm)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (set tokenizer.pad_token = tokenizer.eos_token)")
        self.model, self.tokenizer = model, tokenizer
        self.is_peft_model = model.is_peft()
        self.world_size = distributed.world_size()
        stage = planned_zero_stage(config)
        if ref_model is not None:
            ref_model = load_model(ref_model)[0].requires_grad_(False)
        elif not self.is_peft_model:
            if num_shared_layers is not None and stage == 3:
                warnings.warn("num_shared_layers under ZeRO-3: the shared layers are frozen in the policy but copied "
                              "for the reference (ZeRO-3 cannot shard one tensor for two models)", stacklevel=2)
            ref_model = create_reference_model(lm, num_shared_layers, share=stage != 3)
        elif num_shared_layers is not None:
            raise ConfigError("num_shared_layers is for a copied reference; a PEFT model's reference is the model with "
                             "its adapters disabled")
        # TRL steps no schedule of its own: the rate stays put (after warmup_steps, 0 by default)
        # unless an lr_scheduler is given, and that one steps once per PPO step, not per optimizer step.
        self.engine = Engine(model, config, None, optimizer)
        self.optimizer = self.engine.optimizer
        self.lr_scheduler = lr_scheduler
        self.ref_model = None if ref_model is None else distributed.wrap_for_inference(ref_model, self.engine)
        self.reward_model = None
        if reward_model is not None:
            scorer = load_reward_model(reward_model)[0]
            if isinstance(reward_model, str):
                check_shared_tokens(lm, tokenizer, scorer, reward_model, "reward_model")
            self.reward_model = distributed.wrap_for_inference(scorer, self.engine)
        self.kl_ctl = (AdaptiveKLController(config.init_kl_coef, config.target, config.horizon) if config.adap_kl_ctrl
                       else FixedKLController(config.init_kl_coef))
        self.running = RunningMoments()
        self.perm_generator = torch.Generator().manual_seed(config.seed)
        self.dataset = self._prepare_dataset(dataset) if dataset is not None else None
        self.data_collator = data_collator or dict_of_lists
        self.dataloader = None
        if self.dataset is not None:
            if len(self.dataset) < config.batch_size * self.world_size:
                raise ConfigError(f"batch_size={config.batch_size} (x {self.world_size} processes) is more than the "
                                  f"{len(self.dataset)} prompts of the data set: lower it, or give more prompts")
            self.dataloader = prompt_loader(self.dataset, config.batch_size, config.seed, self.data_collator)
        self.checkpointer = Checkpointer(self.engine, config.output_dir, hf_weights(model, tokenizer), self.extra_state,
                                         self.load_extra_state, config.save_total_limit,
                                         None if self.dataset is None else f"{len(self.dataset)} prompts",
                                         config.overwrite_output_dir)
        self.global_step = 0  # PPO steps done (step() calls)
        self.logger = None

    @property
    def current_step(self) -> int:
        """TRL's name for ``global_step``: the PPO steps done."""
        return self.global_step

    @current_step.setter
    def current_step(self, value: int) -> None:
        self.global_step = value

    # ---- data ----------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset):
        """Rows with ``query`` (text) and ``input_ids`` (the query's tokens), from rows holding either
        (``fastalign.data.prompts``: a ``datasets.Dataset`` is tokenized once, cached)."""
        if self.config.streaming or isinstance(dataset, datasets.IterableDataset):
            raise ConfigError("PPO samples its prompts from a data set it can index: streaming is for sft, reward and dpo")
        return tokenize_prompts(load_rows(dataset) if isinstance(dataset, (str, Path)) else dataset, self.tokenizer,
                                self.config.dataset_num_proc, distributed.local_main_first)

    # ---- generation ----------------------------------------------------------------------------
    def _generation_context(self):
        """Under ZeRO-3 the policy's parameters are gathered once for the whole rollout and the
        per-module gather hooks are lifted, instead of a gather per layer per generated token."""
        if self.engine.zero_stage != 3:
            return contextlib.nullcontext()
        return whole_model(self.engine.deepspeed)

    @torch.no_grad()
    def generate(self, query_tensor: torch.Tensor | list[torch.Tensor], length_sampler: Callable[[], int] | None = None,
                 batch_size: int = 4, return_prompt: bool = True, generate_ref_response: bool = False,
                 remove_padding: bool = True, **generation_kwargs) -> torch.Tensor | list | tuple:
        """Responses of the policy to ``query_tensor``: one 1-D tensor (returns ``[1, L]``) or a list
        of them (returns a list, generated ``batch_size`` at a time with left padding, each cut after
        its first end-of-sequence token with ``remove_padding``). ``length_sampler()`` draws
        ``max_new_tokens`` per generation batch. ``return_prompt=False`` returns the new tokens only.
        With ``generate_ref_response`` also the reference model's responses (a second value)."""
        generation_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if self.tokenizer.eos_token_id is not None:
            generation_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        policy = self.model.pretrained_model
        out = self._generate(policy, query_tensor, length_sampler, batch_size, return_prompt, remove_padding,
                             self._generation_context(), generation_kwargs)
        if not generate_ref_response:
            return out
        ref = self.ref_model if self.ref_model is not None else policy
        context = self._reference_context() if self.ref_model is None else contextlib.nullcontext()
        return out, self._generate(ref, query_tensor, length_sampler, batch_size, return_prompt, remove_padding,
                                   context, generation_kwargs)

    def _generate(self, model, query_tensor, length_sampler, batch_size, return_prompt, remove_padding, context, kwargs):
        return generate_responses(model, query_tensor, device=self.engine.device, pad_token_id=self.tokenizer.pad_token_id,
                                  length_sampler=length_sampler, batch_size=batch_size, return_prompt=return_prompt,
                                  remove_padding=remove_padding, context=context, kwargs=kwargs,
                                  encoder_decoder=self.forwards.encoder_decoder)

    # ---- scoring with a reward model -----------------------------------------------------------
    @torch.no_grad()
    def score(self, queries: list[torch.Tensor], responses: list[torch.Tensor]) -> torch.Tensor:
        """The reward model's score of each query+response, from packed rows: fp32 ``[B]``."""
        if self.reward_model is None:
            raise ValueError("no reward_model was given to the PPOTrainer")
        seqs = [torch.cat([q, r]).tolist() for q, r in zip(queries, responses)]
        scores = torch.zeros(len(seqs), dtype=torch.float32, device=self.engine.device)
        for samples, batch in self._rows([[Sequence(s)] for s in seqs], PACKED):  # the reward model is a causal one
            out = packed_scores(self.reward_model, batch)
            if samples:
                scores[samples] = out
        return scores

    # ---- the rollout forward passes -------------------------------------------------------------
    def _rows(self, units, forwards=None):
        """``(sample indices, packed batch on the device)`` per row of at most
        ``max_tokens_per_batch`` tokens; every process gets as many rows (ZeRO-3 runs the same
        forwards everywhere), the extra ones a copy with no samples."""
        forwards = forwards or self.forwards
        plan = forwards.plan([sum(len(s.input_ids) for s in u) for u in units], self.config.max_tokens_per_batch)
        count = distributed.all_reduce_max(len(plan), self.engine.device) if self.world_size > 1 else len(plan)
        for k in range(count):
            samples = plan[k] if k < len(plan) else []
            yield samples, forwards.collate([units[i] for i in (samples or plan[0])]).to(self.engine.device)

    def _reference_context(self):
        return self.model.pretrained_model.disable_adapter() if self.ref_model is None else contextlib.nullcontext()

    def _reference_outputs(self, batch, pos):
        """The reference's log-probs and hidden states at the loss positions ``pos``, and the model."""
        model = self.ref_model if self.ref_model is not None else self.model.pretrained_model
        with self._reference_context():
            hidden = self.forwards.hidden(model, batch, pos)
            return self.forwards.head_logprobs(model, hidden, batch.labels[pos]), hidden, model

    @torch.no_grad()
    def _rollout(self, queries, responses, response_masks, scores: torch.Tensor) -> Forward:
        """Old log-probs and values of the policy and the reference log-probs at every response
        token, from one packed forward of each model per row; with ``kl_penalty="full"`` also the
        exact per-token KL over the vocabulary (its logits exist a chunk of tokens at a time)."""
        device = self.engine.device
        layout = RolloutLayout.of(queries, responses, device)
        m = layout.num_tokens
        flat = {k: torch.zeros(m, dtype=torch.float32, device=device) for k in ("logp", "ref", "values", "kls")}
        full = self.config.kl_penalty == "full"
        with eval_mode(self.model):
            for samples, batch in self._rows(layout.units()):
                pos = (batch.labels != IGNORE_INDEX).nonzero()[:, 0]  # found once for both models
                with self.engine.autocast():
                    policy = self.engine.forward(
                        functools.partial(self.forwards.policy, self.model, positions=pos), batch)
                    ref_logp, ref_hidden, ref = self._reference_outputs(batch, pos)
                    kls = full_kl(self.model, policy.hidden, ref, ref_hidden, head=self.forwards.head) if full else None
                if not samples:
                    continue
                dest = layout.positions(samples)
                flat["logp"][dest], flat["ref"][dest], flat["values"][dest] = policy.logprobs, ref_logp, policy.values
                if full:
                    flat["kls"][dest] = kls
        mask = (torch.cat([rm.to(device).float() for rm in response_masks]) if response_masks is not None
                else torch.ones(m, device=device))
        return Forward(layout, mask, flat["logp"], flat["ref"], flat["values"], flat["kls"] if full else None, scores)

    # ---- one PPO step --------------------------------------------------------------------------
    def _process_scores(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores to train on, every process's raw scores)``: scaled by the running standard
        deviation of all scores so far (and centred with ``use_score_norm``), then clipped."""
        everyone = torch.tensor(distributed.all_gather_floats(scores.tolist(), self.engine.device), dtype=torch.float32)
        c = self.config
        if c.use_score_scaling:
            self.running.update(everyone)
            factor = self.running.std + torch.finfo(scores.dtype).eps
            scores = (scores - self.running.mean) / factor if c.use_score_norm else scores / factor
        if c.score_clip is not None:
            scores = scores.clamp(-c.score_clip, c.score_clip)
        return scores, everyone

    @torch.no_grad()
    def _advantages(self, r: Forward, watch: Stopwatch) -> Rollout:
        """KL-shaped rewards (fused), then GAE over ``[B, longest response]`` (fused scan): the
        whole rollout."""
        c, cu = self.config, r.layout.cu
        if r.full_kls is None:
            rewards, non_score, kls = compute_rewards_packed(r.scores, r.logprobs, r.ref_logprobs, r.mask, cu,
                                                             self.kl_ctl.value, c.kl_penalty)
        else:  # the full KL came from the forward pass: shape it as a plain difference against 0
            rewards, non_score, kls = compute_rewards_packed(r.scores, r.full_kls, torch.zeros_like(r.full_kls), r.mask,
                                                             cu, self.kl_ctl.value, "kl")
        watch.mark("time/ppo/compute_rewards")
        values, where = r.layout.padded(r.values)
        padded_rewards, _ = r.layout.padded(rewards)
        mask, _ = r.layout.padded(r.mask)
        if c.whiten_rewards:
            padded_rewards = masked_whiten(padded_rewards * mask, mask, shift_mean=False) * mask
        values, advantages, returns = compute_advantages(values, padded_rewards, mask, c.gamma, c.lam)
        return Rollout(r.layout, r.mask, r.logprobs, r.ref_logprobs, values[where], r.scores, kls, rewards, non_score,
                       advantages[where], returns[where])

    def _minibatch_loss(self, batch, old: dict):
        """The PPO loss of one packed mini-batch (run inside the engine's forward); ``old`` holds
        the rollout's per-token tensors at the mini-batch's response tokens."""
        new = self.forwards.policy(self.model, batch, return_entropy=True)
        c = self.config
        row = {k: v.unsqueeze(0) for k, v in old.items()}  # one packed row: masked means over all its tokens
        pg, vf, stats = ppo_loss(
            old_logprobs=row["logprobs"], values=row["values"], vpreds=new.values.unsqueeze(0),
            logprobs=new.logprobs.unsqueeze(0), mask=row["mask"], advantages=row["advantages"], returns=row["returns"],
            cliprange=c.cliprange, cliprange_value=c.cliprange_value, vf_coef=c.vf_coef,
            ratio_threshold=c.ratio_threshold, entropy=new.entropy.detach().unsqueeze(0))
        return pg + vf, stats

    def _optimize(self, r: Rollout) -> tuple[list[dict], int]:
        """``ppo_epochs`` passes of shuffled mini-batches; ``(stats per mini-batch, passes run)``."""
        c = self.config
        units = r.layout.units()
        scale = 1.0 / (c.gradient_accumulation_steps * self.world_size)  # engine.accumulate: x world_size
        all_stats, epochs = [], 0
        with eval_mode(self.model):  # as in TRL 0.7.10, whose forwards all run with dropout off
            for _ in range(c.ppo_epochs):
                epochs += 1
                order = torch.randperm(c.batch_size, generator=self.perm_generator).tolist()
                for start in range(0, c.batch_size, c.mini_batch_size):
                    samples = order[start:start + c.mini_batch_size]
                    batch = self.forwards.collate([units[i] for i in samples]).to(self.engine.device)
                    src = r.layout.positions(samples)
                    old = {"logprobs": r.logprobs[src], "values": r.values[src], "mask": r.mask[src],
                           "advantages": r.advantages[src], "returns": r.returns[src]}
                    with self.engine.autocast():
                        loss, stats = self.engine.forward(self._minibatch_loss, batch, old)
                    ends_step = (start // c.mini_batch_size + 1) % c.gradient_accumulation_steps == 0
                    self.engine.accumulate(loss * scale, last=ends_step)
                    if ends_step:
                        self.engine.step()
                    all_stats.append(stats)
                if c.early_stopping:
                    policykl = distributed.all_reduce_sum([float(all_stats[-1]["policy/policykl"])], self.engine.device)[0]
                    if policykl / self.world_size > 1.5 * c.target_kl:
                        break  # the pass ended on an optimizer step: no gradient is left over
        return all_stats, epochs

    def step(self, queries: list[torch.Tensor], responses: list[torch.Tensor], scores: list[float] | torch.Tensor,
             response_masks: list[torch.Tensor] | None = None) -> dict:
        """One PPO step on ``batch_size`` samples: ``queries`` and ``responses`` lists of 1-D token
        tensors (no padding), ``scores`` one float per sample, ``response_masks`` optional 0/1 per
        response token (0: not the policy's, e.g. a tool's output; no loss, no KL there). Returns
        the stats (TRL's names; distributions as 1-D arrays, the rest floats)."""
        began = time.perf_counter()
        weight = self.model.get_output_embeddings().weight
        vocab = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3: the whole shape, not the local shard
        queries, responses, scores, response_masks = check_step_inputs(
            queries, responses, scores, response_masks, batch_size=self.config.batch_size, vocab=vocab,
            device=self.engine.device)
        scores, raw = self._process_scores(scores)
        watch = Stopwatch()
        forward = self._rollout(queries, responses, response_masks, scores)
        watch.mark("time/ppo/forward_pass")
        r = self._advantages(forward, watch)
        watch.mark("time/ppo/compute_advantages")
        mini_stats, epochs = self._optimize(r)
        watch.mark("time/ppo/optimize_step")
        stats = step_stats(r, raw, mini_stats, epochs, device=self.engine.device, world_size=self.world_size,
                           kl_coef=self.kl_ctl.value, learning_rate=self.optimizer.param_groups[0]["lr"])
        watch.mark("time/ppo/calc_stats")
        stats.update(watch.times)
        stats["time/ppo/total"] = time.perf_counter() - began
        self.kl_ctl.update(stats["objective/kl"], self.config.batch_size * self.world_size)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_step += 1
        self.last_rollout = r
        return stats

    # ---- the loop over a prompt dataset --------------------------------------------------------
    def train(self, reward_fn: Callable[[list[str], list[str]], list[float]] | None = None,
              generation_kwargs: dict | None = None, length_sampler: Callable[[], int] | None = None,
              generation_batch_size: int = 64) -> dict:
        """PPO over ``dataset``: per step, ``batch_size`` prompts, sampled responses, their scores
        (``reward_fn(queries, responses)`` on the decoded texts, returning one float each, or the
        reward model), then ``step``. The run is ``max_steps`` PPO steps when set, else ``ceil(steps /
        batch_size)`` (TRL's ``total_ppo_epochs``), counted in ``global_step``: ``train()`` goes on
        from the steps already done (the resumed checkpoint's, or ``step()`` calls made by hand) up
        to that total, step ``k`` on the dataloader's ``k``-th batch, so it runs nothing once the
        total is reached (raise ``max_steps`` to go on). Logs every step's scalar stats to
        ``metrics.jsonl`` (and the bar), checkpoints every ``save_steps``, saves the model (value
        head included) to ``output_dir`` at the end. Returns the last step's scalar stats and
        ``steps``, the number this call ran."""
        c = self.config
        if self.dataloader is None:
            raise ValueError("train() needs the dataset of prompts given to PPOTrainer(dataset=...)")
        if reward_fn is None and self.reward_model is None:
            raise ValueError("train() needs a reward_fn or the PPOTrainer's reward_model")
        total = c.max_steps if c.max_steps > 0 else c.total_ppo_epochs
        kwargs = {"max_new_tokens": 32, "do_sample": True, "top_k": 0, "top_p": 1.0, **(generation_kwargs or {})}
        new_tokens = getattr(length_sampler, "longest", None) or kwargs["max_new_tokens"]
        check_prompt_lengths(self.dataset, new_tokens, c.max_tokens_per_batch,
                             getattr(self.model.pretrained_model.config, "max_position_embeddings", None))
        resumed = bool(c.resume_from_checkpoint)
        self.checkpointer.total = total
        start = self.start_run(c.resume_from_checkpoint, self.global_step)
        # A resumed run keeps metrics.jsonl's records up to its checkpoint; a fresh one starts it anew.
        loop = Loop(c.output_dir, total, start, report_to=c.report_to, show_bar=not c.disable_tqdm,
                    keep_records_to=start if resumed else 0, bar_keys=BAR_KEYS, device=self.engine.device)
        self.logger = loop.logger
        began, last = time.perf_counter(), {}
        batches = endless(self.dataloader, skip=start)

        def step(_: int) -> list[tuple[int, dict]]:
            nonlocal last
            batch = next(batches)
            queries = batch["input_ids"]
            t0 = time.perf_counter()
            responses = self.generate(queries, length_sampler, generation_batch_size, return_prompt=False, **kwargs)
            t1 = time.perf_counter()
            if reward_fn is not None:
                scores = reward_fn(batch["query"], self.tokenizer.batch_decode(responses, skip_special_tokens=True))
            else:
                scores = self.score(queries, responses)
            t2 = time.perf_counter()
            stats = self.step(queries, responses, scores)
            stats.update({"time/ppo/generation": t1 - t0, "time/ppo/scoring": t2 - t1,
                          "peak_memory_gb": peak_memory_gb(self.engine.device)})
            last = {k: v for k, v in stats.items() if k not in SCALAR_ARRAYS}
            return [(self.global_step, last)]

        try:
            loop.run(step, Cadence(c.logging_steps, save_steps=c.save_steps), window=last_window,
                     save=self.save_checkpoint, finish=lambda: self.save_model(c.output_dir))
        finally:
            self.logger = None
        return {**last, "train_runtime": time.perf_counter() - began, "steps": max(total - start, 0)}

    # ---- checkpoints -------------------------------------------------------------------------
    def extra_state(self) -> dict:
        running = {k: getattr(self.running, k) for k in ("mean", "std", "var", "count")}
        scheduler = None if self.lr_scheduler is None else self.lr_scheduler.state_dict()
        return {"ppo": {"kl_coef": self.kl_ctl.value, "running": running, "perm": self.perm_generator.get_state(),
                        "lr_scheduler": scheduler}}

    def load_extra_state(self, state: dict) -> None:
        ppo = state["ppo"]
        self.kl_ctl.value = ppo["kl_coef"]
        for k, v in ppo["running"].items():
            setattr(self.running, k, v)
        self.perm_generator.set_state(ppo["perm"])
        if self.lr_scheduler is not None and ppo.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(ppo["lr_scheduler"])
