"""PPO for language models (Ziegler et al., "Fine-Tuning Language Models from Human Preferences",
2019), with TRL 0.7.10's options, names and step, on the packed core.

One PPO step (``PPOTrainer.step``) takes ``batch_size`` (query, response, score) samples:

1. scores: optionally scaled by the running standard deviation of all scores so far
   (``use_score_scaling``; also centred with ``use_score_norm``), then clipped (``score_clip``);
2. one padding-free forward each of the policy (log-probs and values) and of the reference
   (log-probs) over query+response, the heads run only at response positions: the whole batch
   is kept flat over its response tokens, sample after sample;
3. rewards per token: ``-kl_coef * kl`` (``kl_penalty``: kl, abs, mse, or the exact ``full``
   KL over the vocabulary), plus the score at each response's last token (fused kernel);
4. GAE advantages and returns (fused scan over ``[batch, longest response]``, nothing longer),
   advantages whitened, rewards too with ``whiten_rewards``;
5. ``ppo_epochs`` passes over the batch in shuffled mini-batches of ``mini_batch_size`` samples
   (each one packed row), the clipped PPO loss (fused kernel), an optimizer step every
   ``gradient_accumulation_steps`` mini-batches; with ``early_stopping`` a pass whose last
   mini-batch has a policy KL over 1.5 x ``target_kl`` ends the step;
6. the KL coefficient adapts to ``target`` (``adap_kl_ctrl``), the stats come back under TRL's
   names (``objective/kl``, ``ppo/policy/approxkl``, ``env/reward_mean``, ...).

Every forward runs in eval mode (no dropout), the training forwards included, as in TRL 0.7.10.
Two things differ from it on purpose. With ``whiten_rewards`` TRL's whitened rewards stay non-zero
at padding and masked positions, so its advantages depend on how much padding a batch has; here
they are zeroed there. And ``max_grad_norm`` clips every optimizer step (TRL 0.7.10 clips only
the first one of a run: its list of parameters is a one-shot iterator).

With several processes each runs ``step`` on its own ``batch_size`` samples (as TRL does); the
gradient is the mean over processes, the stats and the score statistics are global.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import set_seed

from fastalign.data import IGNORE_INDEX, Sequence, load_rows, pack, plan_batches
from fastalign.data.prompts import tokenize_prompts
from fastalign.engine import Engine, TrainingConfig, distributed
from fastalign.engine.engine import adamw, planned_zero_stage
from fastalign.engine.metrics import MetricsLogger
from fastalign.engine.trainer import Checkpointing, peak_memory_gb
from fastalign.kernels import segment_sum
from fastalign.kernels.gae import compute_advantages
from fastalign.kernels.kl import compute_rewards_packed, kl_penalty
from fastalign.kernels.ppo import ppo_loss
from fastalign.kernels.rl import AdaptiveKLController, FixedKLController, RunningMoments, masked_mean, masked_whiten
from fastalign.models import (
    CausalLMWithValueHead,
    gathered,
    head_logprobs,
    lm_head,
    load_model,
    load_reward_model,
    packed_hidden,
    packed_logprobs_and_values,
    packed_scores,
    prepare_model,
)

KL_PENALTIES = ("kl", "abs", "mse", "full")


@dataclass
class PPOConfig(TrainingConfig):
    """TRL 0.7.10's ``PPOConfig`` knobs (same names and defaults) on top of the engine's options.

    A PPO step takes ``batch_size`` (query, response, score) samples, runs ``ppo_epochs`` passes
    over them in shuffled mini-batches of ``mini_batch_size``, and steps the optimizer every
    ``gradient_accumulation_steps`` mini-batches.
    """

    learning_rate: float = 1e-5
    max_grad_norm: float | None = None
    seed: int = 0
    steps: int = 20000  # samples over the whole run (TRL's meaning): steps / batch_size PPO steps
    # KL penalty: adaptive (Ziegler et al.) or fixed coefficient, and its per-token estimator.
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    kl_penalty: str = "kl"
    target: float = 6.0
    horizon: float = 10000.0
    # Advantages and the loss.
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    # Batching.
    batch_size: int = 256
    mini_batch_size: int = 1
    ppo_epochs: int = 4
    # Guards.
    early_stopping: bool = False
    target_kl: float = 1.0  # with early_stopping: stop the epoch once the policy KL exceeds 1.5 x this
    ratio_threshold: float = 10.0  # skip a mini-batch whose mean ratio exceeds this
    # Scores.
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.kl_penalty not in KL_PENALTIES:
            raise ValueError(f"kl_penalty must be one of {KL_PENALTIES}, got {self.kl_penalty!r}")
        backward = self.mini_batch_size * self.gradient_accumulation_steps
        if self.mini_batch_size < 1 or self.batch_size < 1 or self.batch_size % backward:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size x "
                             f"gradient_accumulation_steps ({self.mini_batch_size} x {self.gradient_accumulation_steps})")
        checks = {"ppo_epochs": self.ppo_epochs >= 1, "gamma": 0 <= self.gamma <= 1, "lam": 0 <= self.lam <= 1,
                  "cliprange": self.cliprange > 0, "cliprange_value": self.cliprange_value > 0,
                  "init_kl_coef": self.init_kl_coef >= 0, "target_kl": self.target_kl > 0,
                  "score_clip": self.score_clip is None or self.score_clip > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))
        if self.use_score_norm and not self.use_score_scaling:
            raise ValueError("use_score_norm centres scores as part of score scaling: set use_score_scaling=True too")

    @property
    def backward_batch_size(self) -> int:
        """Samples per optimizer step."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    @property
    def total_ppo_epochs(self) -> int:
        """PPO steps over the run: ``ceil(steps / batch_size)``."""
        return -(-self.steps // self.batch_size)


class LengthSampler:
    """A random ``max_new_tokens`` per generation batch: uniform over ``[min_value, max_value)``."""

    def __init__(self, min_value: int, max_value: int):
        if not 0 < min_value < max_value:
            raise ValueError(f"LengthSampler needs 0 < min_value < max_value, got {min_value}, {max_value}")
        self.values = list(range(min_value, max_value))

    def __call__(self) -> int:
        return random.choice(self.values)


def _sort_digits_reward(queries, responses):
    from fastalign.tasks.sort_digits import sortedness_reward

    return [sortedness_reward(q, r) for q, r in zip(queries, responses)]


BUILTIN_REWARDS = {"sort_digits": _sort_digits_reward}


def named_function(spec: str, builtins: dict, kind: str = "reward_function"):
    """A function by name: one of ``builtins`` or ``package.module:function``."""
    if spec in builtins:
        return builtins[spec]
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{kind} {spec!r}: expected one of {sorted(builtins)} or 'package.module:function'")
    import importlib

    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"{kind} {spec!r}: {module} has no function {name!r}")
    return fn


def reward_function(spec: str):
    """A reward function by name: a built-in (``sort_digits``) or ``package.module:function``."""
    return named_function(spec, BUILTIN_REWARDS)


# Decoder-layer names, to find where the layers shared with the reference stop.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def create_reference_model(model, num_shared_layers: int | None = None, share: bool = True):
    """A frozen reference for ``model`` (a causal LM): a copy, or with ``num_shared_layers`` one
    whose parameters below that layer (embeddings and the first ``num_shared_layers`` layers) are
    the policy's own, frozen in the policy too, so only the layers above are copied (``share=False``
    copies them anyway, frozen in both, for ZeRO-3, which cannot shard one tensor for two models)."""
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    if num_shared_layers is None:
        return ref
    names = [n for n, _ in model.named_parameters()]
    layers = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    if not layers:
        raise ValueError(f"num_shared_layers: no decoder layers found in {type(model).__name__}'s parameter names")
    if not 0 <= num_shared_layers <= max(layers):
        raise ValueError(f"num_shared_layers must be in [0, {max(layers)}] ({max(layers) + 1} layers), got {num_shared_layers}")
    for name, param in model.named_parameters():
        m = _LAYER.search(name)
        if m is not None and int(m.group(1)) >= num_shared_layers:
            break  # parameters come in module order: everything from here on is the policy's own
        param.requires_grad_(False)
        if share:
            owner, _, leaf = name.rpartition(".")
            setattr(ref.get_submodule(owner) if owner else ref, leaf, param)
    return ref


@dataclass
class Rollout:
    """A PPO batch laid out flat over its response tokens, sample after sample: sample ``i`` owns
    positions ``cu[i]:cu[i+1]``. Per-token tensors are fp32 ``[M]``."""

    queries: list
    responses: list
    cu: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kls: torch.Tensor | None = None  # filled in the forward pass for kl_penalty="full"
    scores: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    non_score_rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def units(self) -> list[list[Sequence]]:
        """Each sample as a packing unit: query+response, the loss at the response tokens."""
        return [[Sequence(torch.cat([q, a]).tolist(), [False] * len(q) + [True] * len(a))]
                for q, a in zip(self.queries, self.responses)]

    def positions(self, samples) -> torch.Tensor:
        """Flat positions of ``samples``' response tokens, in that order."""
        cu = self.cu.tolist()
        return torch.cat([torch.arange(cu[i], cu[i + 1]) for i in samples]).to(self.cu.device)

    def padded(self, flat: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``flat [M]`` as ``[B, longest response]`` (zeros after each response), and the
        ``(rows, cols)`` index that reads the flat layout back out of it."""
        lengths = (self.cu[1:] - self.cu[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=flat.device), lengths.to(flat.device))
        cols = torch.arange(flat.numel(), device=flat.device) - self.cu[:-1].long().to(flat.device)[rows]
        out = flat.new_zeros(len(lengths), int(lengths.max()))
        out[rows, cols] = flat
        return out, (rows, cols)


BAR_KEYS = ("env/reward_mean", "objective/kl", "objective/kl_coef")
SCALAR_ARRAYS = ("objective/kl_dist", "tokens/queries_dist", "tokens/responses_dist", "ppo/policy/advantages",
                 "ppo/policy/ratio", "env/reward_dist")


def _dict_of_lists(rows):
    return {key: [row[key] for row in rows] for key in rows[0]}


class PPOTrainer(Checkpointing):
    """PPO on a causal LM with a value head, TRL 0.7.10's interface (``generate``, ``step``) plus
    ``train()`` over a dataset of prompts with a reward function or a reward model.

    ``model``: a ``CausalLMWithValueHead``, a causal LM (a value head is added) or a name or path.
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
        if wrapped:
            model.pretrained_model = lm
        else:
            model = CausalLMWithValueHead(lm)
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
            raise ValueError("num_shared_layers is for a copied reference; a PEFT model's reference is the model with "
                             "its adapters disabled")
        # TRL steps no schedule of its own: the rate stays put unless an lr_scheduler is given, and
        # that one steps once per PPO step, not per optimizer step.
        optimizer = optimizer or adamw(model, config)
        self.engine = Engine(model, config, 1, optimizer,
                             torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0))
        self.optimizer = self.engine.optimizer
        self.lr_scheduler = lr_scheduler
        self.ref_model = None if ref_model is None else distributed.wrap_for_inference(ref_model, self.engine)
        self.reward_model = None
        if reward_model is not None:
            self.reward_model = distributed.wrap_for_inference(load_reward_model(reward_model)[0], self.engine)
        self.kl_ctl = (AdaptiveKLController(config.init_kl_coef, config.target, config.horizon) if config.adap_kl_ctrl
                       else FixedKLController(config.init_kl_coef))
        self.running = RunningMoments()
        self.perm_generator = torch.Generator().manual_seed(config.seed)
        self.dataset = self._prepare_dataset(dataset) if dataset is not None else None
        self.data_collator = data_collator or _dict_of_lists
        self.dataloader = None
        if self.dataset is not None:
            if len(self.dataset) < config.batch_size * self.world_size:
                raise ValueError(f"the dataset has {len(self.dataset)} prompts, fewer than one PPO batch "
                                 f"(batch_size {config.batch_size} x {self.world_size} processes)")
            self.dataloader = self._dataloader()
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
            raise ValueError("PPO samples its prompts from a data set it can index: streaming is for sft, reward and dpo")
        return tokenize_prompts(load_rows(dataset) if isinstance(dataset, (str, Path)) else dataset, self.tokenizer,
                                self.config.dataset_num_proc, distributed.local_main_first)

    def _dataloader(self):
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = None
        if self.world_size > 1:
            sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=distributed.rank(),
                                         shuffle=True, seed=self.config.seed, drop_last=True)
        return DataLoader(self.dataset, batch_size=self.config.batch_size, shuffle=sampler is None, sampler=sampler,
                          drop_last=True, collate_fn=self.data_collator,
                          generator=torch.Generator().manual_seed(self.config.seed) if sampler is None else None)

    def _prompt_batches(self, skip: int = 0):
        """The dataloader's batches, epoch after epoch, after skipping ``skip`` (a resumed run)."""
        epoch = 0
        while True:
            if self.dataloader.sampler is not None and hasattr(self.dataloader.sampler, "set_epoch"):
                self.dataloader.sampler.set_epoch(epoch)
            for batch in self.dataloader:
                if skip:
                    skip -= 1
                    continue
                yield batch
            epoch += 1

    # ---- generation ----------------------------------------------------------------------------
    def _generation_context(self):
        """Under ZeRO-3 the policy's parameters are gathered once for the whole rollout and the
        per-module gather hooks are lifted, instead of a gather per layer per generated token."""
        if self.engine.zero_stage != 3:
            return contextlib.nullcontext()
        return _whole_model(self.engine.deepspeed)

    @torch.no_grad()
    def generate(self, query_tensor, length_sampler=None, batch_size: int = 4, return_prompt: bool = True,
                 generate_ref_response: bool = False, remove_padding: bool = True, **generation_kwargs):
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
        device = self.engine.device
        single = torch.is_tensor(query_tensor) and query_tensor.dim() == 1
        queries = [query_tensor] if single else list(query_tensor)
        was = model.training
        model.eval()
        outputs = []
        try:
            with context:
                for start in range(0, len(queries), batch_size):
                    chunk = [q.to(device).long() for q in queries[start:start + batch_size]]
                    if length_sampler is not None:
                        kwargs["max_new_tokens"] = length_sampler()
                    width = max(len(q) for q in chunk)
                    ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
                    attention = torch.zeros_like(ids)
                    for k, q in enumerate(chunk):  # left padding
                        ids[k, width - len(q):] = q
                        attention[k, width - len(q):] = 1
                    generated = model.generate(input_ids=ids, attention_mask=attention, **kwargs)
                    for k, q in enumerate(chunk):
                        new = generated[k, width:]
                        if remove_padding and kwargs.get("eos_token_id") is not None:
                            ends = (new == kwargs["eos_token_id"]).nonzero()
                            if len(ends):
                                new = new[:int(ends[0]) + 1]  # keep the end-of-sequence token
                        outputs.append(torch.cat([q, new]) if return_prompt else new)
        finally:
            model.train(was)
        return outputs[0].unsqueeze(0) if single else outputs

    # ---- scoring with a reward model -----------------------------------------------------------
    @torch.no_grad()
    def score(self, queries, responses) -> torch.Tensor:
        """The reward model's score of each query+response, from packed rows: fp32 ``[B]``."""
        if self.reward_model is None:
            raise ValueError("no reward_model was given to the PPOTrainer")
        seqs = [torch.cat([q, r]).tolist() for q, r in zip(queries, responses)]
        scores = torch.zeros(len(seqs), dtype=torch.float32, device=self.engine.device)
        for samples, batch in self._rows([[Sequence(s)] for s in seqs]):
            out = packed_scores(self.reward_model, batch)
            if samples:
                scores[samples] = out
        return scores

    # ---- the rollout forward passes -------------------------------------------------------------
    def _rows(self, units):
        """``(sample indices, packed batch on the device)`` per row of at most
        ``max_tokens_per_batch`` tokens; every process gets as many rows (ZeRO-3 runs the same
        forwards everywhere), the extra ones a copy with no samples."""
        plan = plan_batches([sum(len(s.input_ids) for s in u) for u in units], self.config.max_tokens_per_batch)
        count = distributed.all_reduce_max(len(plan), self.engine.device) if self.world_size > 1 else len(plan)
        for k in range(count):
            samples = plan[k] if k < len(plan) else []
            yield samples, pack([units[i] for i in (samples or plan[0])]).to(self.engine.device)

    def _reference_context(self):
        return self.model.pretrained_model.disable_adapter() if self.ref_model is None else contextlib.nullcontext()

    def _reference_outputs(self, batch, pos):
        """The reference's log-probs and hidden states at the loss positions ``pos``, and the model."""
        model = self.ref_model if self.ref_model is not None else self.model.pretrained_model
        with self._reference_context():
            hidden = packed_hidden(model, batch)[pos]
            return head_logprobs(model, hidden, batch.labels[pos]), hidden, model

    @torch.no_grad()
    def _rollout(self, queries, responses, response_masks) -> Rollout:
        """Old log-probs and values of the policy and the reference log-probs at every response
        token, from one packed forward of each model per row; with ``kl_penalty="full"`` also the
        exact per-token KL over the vocabulary (its logits exist a chunk of tokens at a time)."""
        device = self.engine.device
        lengths = [len(r) for r in responses]
        cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        m = int(cu[-1])
        flat = {k: torch.zeros(m, dtype=torch.float32, device=device) for k in ("logp", "ref", "values", "kls")}
        rollout = Rollout(list(queries), list(responses), cu.to(device), torch.ones(m, device=device), None, None, None)
        units = rollout.units()
        full = self.config.kl_penalty == "full"
        was = self.model.training
        self.model.eval()
        try:
            for samples, batch in self._rows(units):
                pos = (batch.labels != IGNORE_INDEX).nonzero()[:, 0]  # found once for both models
                with self.engine.autocast():
                    policy = self.engine.forward(
                        functools.partial(packed_logprobs_and_values, self.model, positions=pos), batch)
                    ref_logp, ref_hidden, ref = self._reference_outputs(batch, pos)
                    kls = _full_kl(self.model, policy.hidden, ref, ref_hidden) if full else None
                if not samples:
                    continue
                dest = rollout.positions(samples)
                flat["logp"][dest], flat["ref"][dest], flat["values"][dest] = policy.logprobs, ref_logp, policy.values
                if full:
                    flat["kls"][dest] = kls
        finally:
            self.model.train(was)
        if response_masks is not None:
            rollout.mask = torch.cat([rm.to(device).float() for rm in response_masks])
        rollout.logprobs, rollout.ref_logprobs, rollout.values = flat["logp"], flat["ref"], flat["values"]
        rollout.kls = flat["kls"] if full else None
        return rollout

    # ---- one PPO step --------------------------------------------------------------------------
    def _check_step_inputs(self, queries, responses, scores, response_masks):
        bs = self.config.batch_size
        named = {"queries": queries, "responses": responses, "scores": scores}
        if response_masks is not None:
            named["response_masks"] = response_masks
        for name, value in named.items():
            if not isinstance(value, (list, tuple)) and not torch.is_tensor(value):
                raise TypeError(f"{name} must be a list, got {type(value).__name__}")
            if len(value) != bs:
                raise ValueError(f"batch_size is {bs} but {name} holds {len(value)} samples")
        weight = self.model.get_output_embeddings().weight
        vocab = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3: the whole shape, not the local shard
        for name in ("queries", "responses"):
            for i, t in enumerate(named[name]):
                if not torch.is_tensor(t) or t.dim() != 1 or t.dtype.is_floating_point:
                    raise TypeError(f"{name}[{i}] must be a 1-D tensor of token ids")
                if t.numel() == 0:
                    raise ValueError(f"{name}[{i}] is empty: PPO needs at least one token in every query and response")
                bad = ((t < 0) | (t >= vocab)).nonzero()
                if len(bad):
                    raise ValueError(f"{name}[{i}], position {int(bad[0])}: token id {int(t[bad[0]])} is outside the "
                                     f"vocabulary [0, {vocab})")
        if response_masks is not None:
            for i, (rm, r) in enumerate(zip(response_masks, responses)):
                if rm.shape != r.shape:
                    raise ValueError(f"response_masks[{i}] has shape {tuple(rm.shape)}, response {i} has {tuple(r.shape)}")
        scores = torch.stack([torch.as_tensor(s, dtype=torch.float32).reshape(()) for s in scores]).to(self.engine.device)
        bad = (~torch.isfinite(scores)).nonzero()
        if len(bad):
            raise ValueError(f"scores[{int(bad[0])}] is {float(scores[bad[0]])}: every score must be finite")
        return list(queries), list(responses), scores, response_masks

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
    def _advantages(self, r: Rollout) -> None:
        """KL-shaped rewards (fused), then GAE over ``[B, longest response]`` (fused scan)."""
        c = self.config
        if r.kls is None:
            rewards, non_score, kls = compute_rewards_packed(r.scores, r.logprobs, r.ref_logprobs, r.mask, r.cu,
                                                             self.kl_ctl.value, c.kl_penalty)
        else:  # the full KL came from the forward pass: shape it as a plain difference against 0
            rewards, non_score, kls = compute_rewards_packed(r.scores, r.kls, torch.zeros_like(r.kls), r.mask, r.cu,
                                                             self.kl_ctl.value, "kl")
        r.rewards, r.non_score_rewards, r.kls = rewards, non_score, kls
        self._timing_mark("time/ppo/compute_rewards")
        values, where = r.padded(r.values)
        rewards, _ = r.padded(rewards)
        mask, _ = r.padded(r.mask)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards * mask, mask, shift_mean=False) * mask
        values, advantages, returns = compute_advantages(values, rewards, mask, c.gamma, c.lam)
        r.values, r.advantages, r.returns = values[where], advantages[where], returns[where]

    def _minibatch_loss(self, batch, old: dict):
        """The PPO loss of one packed mini-batch (run inside the engine's forward)."""
        new = packed_logprobs_and_values(self.model, batch, return_entropy=True)
        c = self.config
        row = lambda t: t.unsqueeze(0)  # noqa: E731  one packed row: masked means over all its tokens
        pg, vf, stats = ppo_loss(row(old["logprobs"]), row(old["values"]), row(new.values), row(new.logprobs),
                                 row(old["mask"]), row(old["advantages"]), row(old["returns"]), c.cliprange,
                                 c.cliprange_value, c.vf_coef, ratio_threshold=c.ratio_threshold,
                                 entropy=row(new.entropy.detach()))
        return pg + vf, stats

    def _optimize(self, r: Rollout) -> tuple[list[dict], int]:
        """``ppo_epochs`` passes of shuffled mini-batches; ``(stats per mini-batch, passes run)``."""
        c = self.config
        units = r.units()
        scale = 1.0 / (c.gradient_accumulation_steps * self.world_size)  # engine.backward: x world_size
        all_stats, epochs = [], 0
        self.model.eval()  # as in TRL 0.7.10, whose forwards all run with dropout off
        for _ in range(c.ppo_epochs):
            epochs += 1
            order = torch.randperm(c.batch_size, generator=self.perm_generator).tolist()
            for start in range(0, c.batch_size, c.mini_batch_size):
                samples = order[start:start + c.mini_batch_size]
                batch = pack([units[i] for i in samples]).to(self.engine.device)
                src = r.positions(samples)
                old = {"logprobs": r.logprobs[src], "values": r.values[src], "mask": r.mask[src],
                       "advantages": r.advantages[src], "returns": r.returns[src]}
                with self.engine.autocast():
                    loss, stats = self.engine.forward(self._minibatch_loss, batch, old)
                self.engine.backward(loss * scale)
                if (start // c.mini_batch_size + 1) % c.gradient_accumulation_steps == 0:
                    self.engine.step()
                all_stats.append(stats)
            if c.early_stopping:
                policykl = distributed.all_reduce_sum([float(all_stats[-1]["policy/policykl"])], self.engine.device)[0]
                if policykl / self.world_size > 1.5 * c.target_kl:
                    break  # the pass ended on an optimizer step: no gradient is left over
        self.model.train()
        return all_stats, epochs

    def _timing_mark(self, key: str) -> None:
        now = time.perf_counter()
        self._timing[key] = now - self._t
        self._t = now

    def step(self, queries, responses, scores, response_masks=None) -> dict:
        """One PPO step on ``batch_size`` samples: ``queries`` and ``responses`` lists of 1-D token
        tensors (no padding), ``scores`` one float per sample, ``response_masks`` optional 0/1 per
        response token (0: not the policy's, e.g. a tool's output; no loss, no KL there). Returns
        the stats (TRL's names; distributions as 1-D arrays, the rest floats)."""
        began = time.perf_counter()
        queries, responses, scores, response_masks = self._check_step_inputs(queries, responses, scores, response_masks)
        scores, raw = self._process_scores(scores)
        self._timing, self._t = {}, time.perf_counter()
        r = self._rollout(queries, responses, response_masks)
        r.scores = scores
        self._timing_mark("time/ppo/forward_pass")
        self._advantages(r)
        self._timing_mark("time/ppo/compute_advantages")
        mini_stats, epochs = self._optimize(r)
        self._timing_mark("time/ppo/optimize_step")
        stats = self._step_stats(r, raw, mini_stats, epochs)
        self._timing_mark("time/ppo/calc_stats")
        stats.update(self._timing)
        stats["time/ppo/total"] = time.perf_counter() - began
        self.kl_ctl.update(stats["objective/kl"], self.config.batch_size * self.world_size)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_step += 1
        self.last_rollout = r
        return stats

    def _step_stats(self, r: Rollout, raw: torch.Tensor, mini_stats: list[dict], epochs: int) -> dict:
        mask = r.mask
        kl_per_sample = segment_sum(r.kls * mask, cu_seqlens=r.cu)
        entropy = segment_sum(-r.logprobs * mask, cu_seqlens=r.cu)
        q_len = torch.tensor([len(q) for q in r.queries], dtype=torch.float32)
        a_len = torch.tensor([len(a) for a in r.responses], dtype=torch.float32)
        scalars = {
            "objective/kl": kl_per_sample.mean(), "objective/entropy": entropy.mean(),
            "ppo/mean_non_score_reward": masked_mean(r.non_score_rewards, mask),
            "tokens/queries_len_mean": q_len.mean(), "tokens/queries_len_std": _std(q_len),
            "tokens/responses_len_mean": a_len.mean(), "tokens/responses_len_std": _std(a_len),
        }
        for key in mini_stats[0]:
            if key not in ("policy/advantages", "policy/ratio"):
                scalars[f"ppo/{key}"] = torch.stack([torch.as_tensor(s[key]).float() for s in mini_stats]).mean()
        names = sorted(scalars)
        values = distributed.all_reduce_sum([float(scalars[k]) for k in names], self.engine.device)
        stats = {k: v / self.world_size for k, v in zip(names, values)}
        # Scores: statistics over every process's (the raw ones come gathered already).
        scaled = torch.tensor(distributed.all_gather_floats(r.scores.tolist(), self.engine.device))
        stats["ppo/mean_scores"], stats["ppo/std_scores"] = float(scaled.mean()), _std(scaled)
        stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
        stats["objective/kl_coef"] = self.kl_ctl.value
        stats["ppo/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        stats["ppo/epochs"] = epochs
        stats["env/reward_mean"] = float(raw.mean())
        stats["env/reward_std"] = _std(raw)
        if stats["objective/kl"] < -1.0:
            warnings.warn(f"the KL estimate is negative ({stats['objective/kl']:.2f}): sampling is probably not from "
                          "the policy (check the generation kwargs: no top_k/top_p/min_length truncation)", stacklevel=3)
        stats.update({
            "objective/kl_dist": kl_per_sample.cpu().numpy(), "tokens/queries_dist": q_len.numpy(),
            "tokens/responses_dist": a_len.numpy(), "env/reward_dist": raw.cpu().numpy(),
            "ppo/policy/advantages": torch.cat([s["policy/advantages"].flatten() for s in mini_stats]).cpu().numpy(),
            "ppo/policy/ratio": torch.cat([s["policy/ratio"].flatten() for s in mini_stats]).cpu().numpy(),
        })
        return stats

    # ---- the loop over a prompt dataset --------------------------------------------------------
    def train(self, reward_fn=None, generation_kwargs: dict | None = None, length_sampler=None,
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
        resumed = bool(c.resume_from_checkpoint)
        start = self._resume() if resumed else self.global_step
        # A resumed run keeps metrics.jsonl's records up to its checkpoint; a fresh one starts it anew.
        self.logger = MetricsLogger(c.output_dir, total, start if resumed else 0, c.report_to,
                                    enabled=distributed.is_main(), show_bar=not c.disable_tqdm, bar_keys=BAR_KEYS,
                                    bar_initial=start)
        began, last = time.perf_counter(), {}
        batches = self._prompt_batches(skip=start)
        try:
            for _ in range(start, total):
                batch = next(batches)
                queries = batch["input_ids"]
                t0 = time.perf_counter()
                responses = self.generate(queries, length_sampler, generation_batch_size, return_prompt=False, **kwargs)
                t1 = time.perf_counter()
                if reward_fn is not None:
                    texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
                    scores = reward_fn(batch["query"], texts)
                else:
                    scores = self.score(queries, responses)
                t2 = time.perf_counter()
                stats = self.step(queries, responses, scores)
                stats.update({"time/ppo/generation": t1 - t0, "time/ppo/scoring": t2 - t1,
                              "peak_memory_gb": peak_memory_gb(self.engine.device)})
                done = self.global_step
                last = {k: v for k, v in stats.items() if k not in SCALAR_ARRAYS}
                if done % c.logging_steps == 0 or done == total:
                    self.logger.log(done, last)
                if c.save_steps and done % c.save_steps == 0:
                    self.save_checkpoint()
                self.logger.advance()
            self.save_model(c.output_dir)
        finally:
            self.logger.close()
        return {**last, "train_runtime": time.perf_counter() - began, "steps": max(total - start, 0)}

    # ---- checkpoints ---------------------------------------------------------------------------
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


def _full_kl(policy, hidden, ref, ref_hidden, chunk: int = 256) -> torch.Tensor:
    """Exact KL(policy || reference) over the vocabulary at each row of ``hidden`` (fp32 ``[M]``),
    the logits of ``chunk`` tokens at a time."""
    w, b = lm_head(policy)
    rw, rb = lm_head(ref)
    out = []
    with gathered(w, b), gathered(rw, rb):
        for s in range(0, hidden.shape[0], chunk):
            x = torch.nn.functional.linear(hidden[s:s + chunk], w, b)
            y = torch.nn.functional.linear(ref_hidden[s:s + chunk], rw, rb)
            out.append(kl_penalty(x, y, "full"))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _std(x: torch.Tensor) -> float:
    """Unbiased standard deviation; 0 for a single value."""
    return float(x.std()) if x.numel() > 1 else 0.0


@contextlib.contextmanager
def _whole_model(ds_engine):
    """ZeRO-3: every parameter gathered once, the per-module fetch/release hooks lifted meanwhile."""
    import deepspeed

    offload = ds_engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(ds_engine.module.parameters()), modifier_rank=None):
        offload._remove_module_hooks()
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()
