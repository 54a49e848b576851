"""``GroupTrainer``: what GRPO and RLOO share, the model and its reference, the reward functions,
the rollouts, the optimizer steps over packed rows, checkpoints and the engine's one outer loop.
An algorithm supplies its advantages (``advantages(scored)``), its row loss (``row_loss``) and
whether it needs the sampling policy's log-probs (``needs_old_logprobs``)."""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from pathlib import Path

import datasets
import torch
from transformers import set_seed

from fastalign.data import IGNORE_INDEX, load_rows
from fastalign.data.prompts import tokenize_prompts
from fastalign.engine import Engine, distributed
from fastalign.engine.checkpoint import Checkpointed, Checkpointer, hf_weights
from fastalign.engine.loop import POSITION, Cadence, Loop
from fastalign.engine.metrics import peak_memory_gb
from fastalign.errors import ConfigError, DataError
from fastalign.models import head_logprobs, load_model, load_reward_model, packed_hidden, prepare_model
from fastalign.models.loading import check_shared_tokens

from ..dpo import disable_dropout
from .config import GroupConfig
from .generation import ModelGenerator, sampling_options, zero3_context
from .launch import GROUP_KEYS, launch_group
from .objective import MicroBatch, RowInputs, StepMetrics
from .prompts import PromptSampler, check_room, render_conversations
from .rewards import RewardFunctions
from .rollout import Rollout, Rollouts, Scored, equal_rows

BAR_KEYS = ("reward", "loss", "kl")
# Where the run is, not what a window did: a logging window keeps the last value.
LAST = POSITION + ("learning_rate", "num_tokens")


def window(records: list[dict]) -> dict:
    """A logging window's metrics: each the mean over the steps that logged it (a step that reuses
    a generation logs no reward), the run's position the last."""
    out = {}
    for key in dict.fromkeys(k for r in records for k in r):
        values = [r[key] for r in records if key in r]
        out[key] = values[-1] if key in LAST else sum(values) / len(values)
    return out


class GroupTrainer(Checkpointed):
    """GRPO's and RLOO's trainer (see ``GRPOTrainer`` and ``RLOOTrainer`` for their arguments)."""

    model_loader = staticmethod(load_model)
    peft_task_type = "CAUSAL_LM"
    run_keys = GROUP_KEYS
    launch = classmethod(launch_group)
    config_class = GroupConfig

    def __init__(self, model, reward_funcs=None, args: GroupConfig | None = None, train_dataset=None,
                 processing_class=None, *, tokenizer=None, peft_config=None, ref_model=None, generator=None,
                 optimizers=(None, None)):
        args = args or self.config_class()
        self.args = self.config = args
        set_seed(args.seed)
        if train_dataset is None:
            raise ValueError(f"{type(self).__name__} needs a train_dataset of prompts")
        model, tokenizer, self.attention = prepare_model(model, processing_class or tokenizer, peft_config,
                                                         self.model_loader)

        def scorer(name):  # a reward model reads the policy's token ids
            loaded = load_reward_model(name)[0]
            check_shared_tokens(model, tokenizer, loaded, name, "reward_funcs")
            return loaded

        self.rewards = RewardFunctions.of(reward_funcs, args.reward_weights, scorer)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (set tokenizer.pad_token = tokenizer.eos_token)")
        if args.disable_dropout:
            disable_dropout(model)
        self.model, self.tokenizer = model, tokenizer
        self.is_peft = hasattr(model, "peft_config")
        self.world_size = distributed.world_size()
        self.dataset = self._prepare_dataset(train_dataset)
        self.prompts_cut = check_room(self.dataset, args, getattr(model.config, "max_position_embeddings", None))
        self.sampler = PromptSampler(len(self.dataset), args.prompts_per_generation, args.num_generations, args.seed,
                                     args.shuffle_dataset, distributed.rank(), self.world_size)
        ga = args.gradient_accumulation_steps
        self.steps_per_epoch = -(-self.sampler.per_epoch * args.generate_every // ga)
        self.num_training_steps = args.max_steps if args.max_steps > 0 else args.num_train_epochs * self.steps_per_epoch
        # The reference, only when the KL term is on: a separate model, the PEFT model with its
        # adapters off, or a frozen copy of the model as it is now.
        reference = None
        if args.beta != 0.0 and ref_model is not None:
            reference = load_model(str(ref_model) if isinstance(ref_model, Path) else ref_model)[0]
        elif args.beta != 0.0 and not self.is_peft:
            reference = copy.deepcopy(model)
        self.engine = Engine(model, args, self.num_training_steps, *optimizers)
        self.optimizer = self.engine.optimizer
        self.ref_model = None if reference is None else distributed.wrap_for_inference(reference, self.engine)
        for i in self.rewards.models:
            self.rewards.funcs[i] = distributed.wrap_for_inference(self.rewards.funcs[i], self.engine)
        zero3 = self.engine.zero_stage == 3
        self.generator = generator or ModelGenerator(
            model, self.engine.device, tokenizer.pad_token_id, tokenizer.eos_token_id,
            context=zero3_context(self.engine) if args.ds3_gather_for_generation else contextlib.nullcontext,
            synced=zero3 and not args.ds3_gather_for_generation)
        peft_reference = args.beta != 0.0 and self.ref_model is None
        self.rollouts = Rollouts(args, self.engine, model, model if peft_reference else self.ref_model,
                                 model.disable_adapter if peft_reference else contextlib.nullcontext, self.rewards,
                                 self.generator, tokenizer, self.dataset, self.sampler, self.needs_old_logprobs,
                                 self.advantages)
        self.checkpointer = Checkpointer(self.engine, args.output_dir, hf_weights(model, tokenizer), self.extra_state,
                                         self.load_extra_state, args.save_total_limit, f"{len(self.dataset)} prompts",
                                         args.overwrite_output_dir, total=self.num_training_steps)
        self.global_step = 0  # optimizer steps done
        self.rollout: Rollout | None = None  # the generation being trained on
        self.num_tokens = 0.0  # prompt and completion tokens generated so far, every process's
        self.last_generation: dict = {}  # the metrics of the latest generation
        self.logger = None

    # ---- what an algorithm supplies --------------------------------------------------------------
    @property
    def needs_old_logprobs(self) -> bool:
        """Whether a generation's own log-probs are recorded: when it serves several optimizer
        steps (TRL: ``gradient_accumulation_steps % (steps_per_generation x num_iterations)``)."""
        return self.args.gradient_accumulation_steps % self.args.generate_every != 0

    def advantages(self, scored: Scored) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def row_loss(self, row: RowInputs, micro: MicroBatch, num_items: float) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # ---- data ------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset):
        """Prompt rows with ``query`` and ``input_ids`` (``fastalign.data.prompts``); conversational
        prompts (lists of messages) rendered with the chat template, the assistant's turn opened."""
        if isinstance(dataset, datasets.IterableDataset):
            raise ConfigError("GRPO and RLOO sample prompts from a data set they can index, not a stream")
        rows = load_rows(dataset) if isinstance(dataset, (str, Path)) else dataset
        rows = render_conversations(rows, self.tokenizer)
        prepared = tokenize_prompts(rows, self.tokenizer, self.args.dataset_num_proc, distributed.local_main_first)
        if len(prepared) == 0:
            raise DataError(f"{dataset if isinstance(dataset, (str, Path)) else 'the data set'}: holds no prompts")
        return prepared

    # ---- one optimizer step ----------------------------------------------------------------------
    @property
    def sampling(self) -> dict:
        return sampling_options(self.args)

    def _row_loss(self, batch, chosen: list[int], micro: MicroBatch) -> tuple[torch.Tensor, dict]:
        """The row's loss (run inside the engine's forward): the policy's log-probs and entropies
        at the row's completion tokens, through the fused head, against the rollout's records."""
        r = self.rollout
        pos = (batch.labels != IGNORE_INDEX).nonzero()[:, 0]
        hidden = packed_hidden(self.model, batch)[pos]
        logp, entropy = head_logprobs(self.model, hidden, batch.labels[pos], self.args.temperature, return_entropy=True)
        src = r.layout.positions(chosen)
        cu = torch.zeros(len(chosen) + 1, dtype=torch.long, device=logp.device)
        cu[1:] = torch.tensor([len(r.layout.responses[i]) for i in chosen], device=logp.device).cumsum(0)
        pick = lambda t: None if t is None else t[src]  # noqa: E731
        row = RowInputs(logp, entropy, pick(r.old_logprobs), pick(r.ref_logprobs), r.mask[src], cu,
                        r.advantages[chosen])
        return self.row_loss(row, micro, r.num_items)

    def _micro_step(self, samples: list[int], metrics: StepMetrics, last: bool) -> float:
        """Forward and backward of one micro-batch (its rows); its loss, this process's."""
        r, c = self.rollout, self.args
        units = r.units
        micro = MicroBatch(len(samples), float(r.mask[r.layout.positions(samples)].sum()))
        scale = 1.0 / (c.gradient_accumulation_steps * self.world_size)  # engine.accumulate sums the processes
        metrics.start_micro_batch()
        rows = list(equal_rows([units[i] for i in samples], c.max_tokens_per_batch, self.engine.device))
        total = 0.0
        for n, (own, batch) in enumerate(rows):
            chosen = [samples[i] for i in (own or [0])]
            with self.engine.autocast():
                loss, sums = self.engine.forward(self._row_loss, batch, chosen, micro)
            if own:
                if not torch.isfinite(loss):
                    self.engine.optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {self.global_step}: stopping "
                                             "before the weights are touched (lower the learning rate, or check the "
                                             "rewards)")
                metrics.add(sums)
                total += float(loss.detach()) * scale * self.world_size
            self.engine.accumulate(loss * (scale if own else 0.0), last=last and n == len(rows) - 1)
        return total

    def train_step(self, step: int) -> dict:
        """Optimizer step ``step``: ``gradient_accumulation_steps`` micro-steps, a new generation
        at every ``steps_per_generation x num_iterations``-th; its metrics (TRL's names)."""
        c, device = self.args, self.engine.device
        began, lr, ga = time.perf_counter(), self.engine.lr, c.gradient_accumulation_steps
        generated, metrics, loss, optimize = [], StepMetrics(), 0.0, 0.0
        for j in range(ga):
            k = step * ga + j
            if k % c.generate_every == 0 or self.rollout is None:
                self.rollout, record = self.rollouts.make(k // c.generate_every, self.sampling)
                self.num_tokens += record.pop("tokens")
                generated.append(record)
            t0 = time.perf_counter()
            loss += self._micro_step(self.rollout.micro_batch(k % c.steps_per_generation, c.steps_per_generation),
                                     metrics, last=j == ga - 1)
            optimize += time.perf_counter() - t0
        t0 = time.perf_counter()
        grad_norm = self.engine.step()
        out = {"loss": distributed.all_reduce_sum([loss], device)[0] / self.world_size, "grad_norm": grad_norm,
               "learning_rate": lr, **metrics.reduce(device)}
        if generated:
            self.last_generation = window(generated)
            out.update(self.last_generation)
        self.global_step = step + 1
        out.update({"time/optimization": optimize + time.perf_counter() - t0, "num_tokens": self.num_tokens,
                    "epoch": self.global_step / self.steps_per_epoch, "step_time": time.perf_counter() - began,
                    "peak_memory_gb": peak_memory_gb(device)})
        return out

    # ---- the run ---------------------------------------------------------------------------------
    def train(self) -> dict:
        """The run: ``max_steps`` optimizer steps (else ``num_train_epochs`` passes over the prompts),
        from the resumed checkpoint's step with ``resume_from_checkpoint``; metrics every
        ``logging_steps`` to ``metrics.jsonl``, a checkpoint every ``save_steps``, the model saved
        to ``output_dir`` at the end. Returns the last step's metrics (with the latest
        generation's), ``train_runtime`` and ``steps`` (the number this call ran)."""
        c = self.args
        set_seed(c.seed)  # the run repeats whatever ran between construction and train()
        if self.prompts_cut and distributed.is_main():
            print(f"fastalign: {self.prompts_cut} of {len(self.dataset)} prompts cut to their last "
                  f"{c.max_prompt_length} tokens (max_prompt_length)", file=sys.stderr)
        start = self.start_run(c.resume_from_checkpoint, self.global_step)
        loop = Loop(c.output_dir, self.num_training_steps, start, report_to=c.report_to, show_bar=not c.disable_tqdm,
                    bar_keys=BAR_KEYS, device=self.engine.device)
        self.logger = loop.logger
        began, last = time.perf_counter(), {}

        def step(k: int) -> list[tuple[int, dict]]:
            nonlocal last
            last = self.train_step(k)
            return [(self.global_step, last)]

        self.model.train()
        try:
            loop.run(step, Cadence(c.logging_steps, save_steps=c.save_steps), window=window,
                     save=self.save_checkpoint, finish=lambda: self.save_model(c.output_dir))
        finally:
            self.logger = None
        return {**self.last_generation, **last, "train_runtime": time.perf_counter() - began,
                "steps": max(self.num_training_steps - start, 0)}

    # ---- checkpoints -----------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"group": {"rollout": None if self.rollout is None else self.rollout.state(),
                          "num_tokens": self.num_tokens}}

    def load_extra_state(self, state: dict) -> None:
        saved = state["group"]
        self.num_tokens = saved["num_tokens"]
        self.rollout = None if saved["rollout"] is None else Rollout.from_state(saved["rollout"], self.engine.device)

