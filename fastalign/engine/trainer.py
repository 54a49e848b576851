"""The trainer of the packed-batch algorithms (SFT, reward, DPO): planned steps over a token store.

An algorithm subclasses ``Trainer`` and supplies two things:

- ``compute_loss(batch) -> (loss_sum, sums)``: the loss of one packed micro-batch as a *sum*
  (over loss tokens for SFT, over pairs for preference losses) and a dict of other sums to log;
- ``batch_weight(batch)``: what the sums count (default: the batch's loss tokens).

Its data is a token store (``fastalign.data.store``): the epoch's micro-batches are planned from
the units' lengths once, and each process builds the ``PackedBatch``es of its own share of a step
when the step runs. Each optimizer step takes ``gradient_accumulation_steps x world_size`` packed
micro-batches, known in advance, and divides every sum by the step's total weight. The gradient and the logged values
are therefore exact means over the step, however it is split across micro-batches and devices.
When an epoch's last step has fewer micro-batches than that, the processes left without one run a
weight-0 copy, so every process does the same forwards (ZeRO-3 needs it) and no data is dropped.

``LossPasses``, the base of ``Trainer``, is the micro-batch pass alone (``compute_loss``,
``batch_weight``, ``_pass``), for trainers whose steps the caller drives (``IterativeSFTTrainer``).
"""

from __future__ import annotations

import math
import sys
import time
from typing import TypeVar

import torch
from transformers import set_seed

from fastalign.data import PackedBatch, pack, plan_units
from fastalign.data.store import Batches, Stream, StreamBatches, TokenStore
from fastalign.errors import ConfigError, DataError
from fastalign.models.modes import eval_mode

from . import distributed
from .checkpoint import Checkpointed, Checkpointer, hf_weights
from .config import TrainingConfig
from .engine import Engine
from .loop import Cadence, Loop
from .metrics import peak_memory_gb

T = TypeVar("T")


class LossPasses:
    """An algorithm's loss run over packed micro-batches, shared by ``Trainer`` and the trainers the
    caller drives step by step (``IterativeSFTTrainer``): the algorithm supplies ``compute_loss``
    (and ``batch_weight`` when its sums count something else than loss tokens), ``_pass`` runs
    them. Needs ``engine`` and ``global_step``."""

    def batch_weight(self, batch: PackedBatch) -> float:
        return float(batch.num_loss_tokens)

    def compute_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def _pass(self, share, total_weight: float | None = None, source=None) -> dict:
        """Forward every micro-batch of ``share`` (and, given the step's ``total_weight``, backward
        its share of the step, the last one ending the step); the counted sums over all processes:
        ``_loss``, ``_weight``, ``_tokens``, ``_real_tokens`` and the algorithm's own sums.
        ``share`` holds ``(batch, counts)``, or ``(k, counts)`` with the batch built as ``source[k]``."""
        totals = {"_loss": 0.0, "_weight": 0.0, "_tokens": 0.0, "_real_tokens": 0.0}
        for k, (item, counts) in enumerate(share):
            batch = source[item] if source is not None else item
            with self.engine.autocast():
                loss_sum, batch_sums = self.engine.forward(self.compute_loss, batch.to(self.engine.device))
            if total_weight is not None:
                if not torch.isfinite(loss_sum):
                    self.engine.optimizer.zero_grad(set_to_none=True)  # the step's earlier micro-batches' too
                    raise FloatingPointError(
                        f"non-finite loss ({loss_sum.item()}) at step {self.global_step}: stopping before the "
                        "weights are touched (lower the learning rate, check the data, or try fp32)"
                    )
                self.engine.accumulate(loss_sum * (1.0 / total_weight if counts else 0.0), last=k == len(share) - 1)
            if counts:  # counted on the batch as given (on the host): no device sync
                totals["_loss"] += loss_sum.item()
                totals["_weight"] += self.batch_weight(batch)
                totals["_tokens"] += batch.num_tokens
                totals["_real_tokens"] += batch.num_real_tokens
            # Every process all-reduces the same keys: a weight-0 copy adds zeros.
            for key, value in batch_sums.items():
                totals[key] = totals.get(key, 0.0) + (float(value) if counts else 0.0)
        keys = sorted(totals)
        return dict(zip(keys, distributed.all_reduce_sum([totals[k] for k in keys], self.engine.device)))


ROTARY = ("rope_theta", "rope_scaling", "rope_parameters", "rotary_dim", "rotary_pct", "partial_rotary_factor")


def check_positions(model, store: TokenStore) -> None:
    """Sequences longer than the model's ``max_position_embeddings``: refused for a model of learned
    positions (it has none past them), said once for rotary ones (positions it was not trained on)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or not len(store):
        return
    row, tokens = store.longest_sequence()
    if tokens <= positions:
        return
    where = f"{store.source}: " if store.source else ""
    text = (f"{where}row {row} has a sequence of {tokens} tokens, more than the model's max_position_embeddings="
            f"{positions}")
    if not any(getattr(config, key, None) is not None for key in ROTARY):
        raise DataError(f"{text}: set max_length to at most {positions}")
    if distributed.is_main():
        print(f"fastalign: warning: {text}: positions past it were never trained (set max_length to keep within it)",
              file=sys.stderr)


class Trainer(LossPasses, Checkpointed):
    # How an epoch is planned (unit lengths, token budget -> arrays of units) and how a micro-batch
    # is built (units, extras -> batch): packed by default; an encoder-decoder model's trainer sets
    # the padded ones (``plan_padded``, ``fastalign.models.seq2seq_collator``) before ``__init__``.
    planner = staticmethod(plan_units)
    collate = staticmethod(pack)

    def __init__(self, model, args: TrainingConfig, train_data: TokenStore | Stream,
                 eval_data: TokenStore | None = None, tokenizer=None, optimizers=(None, None)):
        self.streamed = isinstance(train_data, Stream)
        if self.streamed and args.max_steps <= 0:
            raise ConfigError("a streamed training set has no known length: set max_steps")
        if isinstance(eval_data, Stream):
            raise ConfigError("the evaluation set cannot be streamed: give a Dataset, a list or a file")
        if not self.streamed and len(train_data.kept) == 0:
            where = f"{train_data.source}: " if train_data.source else ""
            raise DataError(f"{where}nothing left to train on after tokenization and truncation: {train_data.report}")
        for data in (train_data, eval_data):
            if isinstance(data, TokenStore):
                check_positions(model, data)
        self.args = args
        self.tokenizer = tokenizer
        self.train_batches = self.make_batches(train_data)
        self.eval_batches = self.make_batches(eval_data) if eval_data is not None and len(eval_data.kept) else []
        self.world_size = distributed.world_size()
        self.group_size = args.gradient_accumulation_steps * self.world_size
        self.steps_per_epoch = None if self.streamed else math.ceil(len(self.train_batches) / self.group_size)
        self.num_training_steps = args.max_steps if args.max_steps > 0 else args.num_train_epochs * self.steps_per_epoch
        self.engine = Engine(model, args, self.num_training_steps, *optimizers)
        self.model = model
        data = None if self.streamed else f"{len(train_data)} rows, {int(train_data.lengths.sum())} tokens"
        self.checkpointer = Checkpointer(self.engine, args.output_dir, hf_weights(model, tokenizer), self.extra_state,
                                         self.load_extra_state, args.save_total_limit, data, args.overwrite_output_dir,
                                         total=self.num_training_steps)
        self.global_step = 0  # optimizer steps done
        self.logger = None

    # ---- what an algorithm supplies (with compute_loss and batch_weight) ------------------------
    def plan(self, store: TokenStore) -> list:
        """The micro-batches of an epoch as lists of units (store rows): best-fit decreasing into
        ``max_tokens_per_batch``, from the lengths alone."""
        kept, budget = store.kept, self.args.max_tokens_per_batch
        lengths = store.lengths[kept]
        if len(lengths) and lengths.max() > budget:
            row = store.first_row + int(kept[lengths.argmax()])
            both = " (its two halves)" if len(store.halves) == 2 else ""
            where = f"{store.source}: " if store.source else ""
            raise DataError(f"{where}row {row} has {int(lengths.max())} tokens{both}, more than max_tokens_per_batch="
                            f"{budget}: raise it{' to at least 2 x max_length' if both else ''}, or lower max_length")
        return [kept[units] for units in self.planner(lengths, budget)]

    def make_batches(self, data: TokenStore | Stream) -> Batches | StreamBatches:
        if isinstance(data, Stream):
            return StreamBatches(data.rows, data.encode, data.halves, self.plan, self.args.stream_window_rows,
                                 self.args.seed if self.args.shuffle else None, self.collate)
        return Batches(data, self.plan(data), self.collate)

    def extra_state(self) -> dict:
        return {"stream": self.train_batches.state()} if self.streamed else {}

    def load_extra_state(self, state: dict) -> None:
        if self.streamed:
            self.train_batches.load_state(state["stream"])

    # ---- the loop ------------------------------------------------------------------------------
    def step_plan(self, step: int) -> list[int]:
        """The micro-batches (indices into ``train_batches``) of optimizer step ``step``, all
        processes' together; every epoch has its own order, from the seed. A stream's are its next
        ones (call once per step, in order)."""
        if self.streamed:
            return self.train_batches.take(self.group_size)
        epoch, k = divmod(step, self.steps_per_epoch)
        order = range(len(self.train_batches))
        if self.args.shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.args.seed + epoch)).tolist()
        return list(order[k * self.group_size:(k + 1) * self.group_size])

    def step_batches(self, step: int) -> list[PackedBatch]:
        """The packed micro-batches of optimizer step ``step`` (all processes')."""
        return [self.train_batches[k] for k in self.step_plan(step)]

    def _my_share(self, batches: list[T], size: int | None = None) -> list[tuple[T, bool]]:
        """This process's part of ``batches`` (or of their indices) padded to ``size`` (a multiple of
        the world size; by default the smallest that holds them all), each with whether it counts:
        the padding is a weight-0 copy of the first, so every process runs as many forwards as the
        others."""
        if size is None:
            size = math.ceil(len(batches) / self.world_size) * self.world_size
        padded = batches + [None] * (size - len(batches))
        mine = padded[distributed.rank()::self.world_size]
        return [(b, True) if b is not None else (batches[0], False) for b in mine]

    def _run_step(self, group: list[int]) -> dict:
        """One optimizer step over the micro-batches ``group`` (indices into ``train_batches``):
        each process builds and runs its own share."""
        total_weight = sum(self.train_batches.weight(k) for k in group)
        if total_weight <= 0:
            raise DataError(f"step {self.global_step}: its micro-batches carry no loss (weight 0)")
        # Under DeepSpeed every process runs exactly gradient_accumulation_steps of them, the
        # micro-batches its config says a step has (``_pass`` marks the last one too).
        size = self.group_size if self.engine.deepspeed is not None else len(group)
        sums = self._pass(self._my_share(group, size), total_weight, self.train_batches)
        tokens = sums.pop("_tokens")
        # Pad tokens over all tokens computed: 0 by construction for packed batches.
        metrics = {"loss": sums.pop("_loss") / total_weight, "num_tokens": tokens,
                   "padding_fraction": 1 - sums.pop("_real_tokens") / tokens}
        del sums["_weight"]
        metrics.update({k: v / total_weight for k, v in sums.items()})
        return metrics

    def evaluate(self) -> dict:
        """Exact means of the loss and the logged sums over the evaluation set, prefixed ``eval/``."""
        if not self.eval_batches:
            return {}
        with torch.no_grad(), eval_mode(self.model):
            sums = self._pass(self._my_share(list(range(len(self.eval_batches)))), source=self.eval_batches)
        weight = sums.pop("_weight")
        for key in ("_tokens", "_real_tokens"):
            del sums[key]
        out = {"eval/loss": sums.pop("_loss") / weight}
        out.update({f"eval/{k}": v / weight for k, v in sums.items()})
        return out

    def train_step(self, step: int) -> dict:
        """Optimizer step ``step``: its metrics (``loss``, ``grad_norm``, ``lr``, throughput, ...)."""
        self.global_step = step
        began = time.perf_counter()
        lr = self.engine.lr
        metrics = self._run_step(self.step_plan(step))
        metrics["grad_norm"] = self.engine.step()
        seconds = time.perf_counter() - began
        epoch = self.train_batches.epoch if self.streamed else (step + 1) / self.steps_per_epoch
        metrics.update(lr=lr, epoch=epoch, seconds_per_step=seconds, tokens_per_s=metrics["num_tokens"] / seconds,
                       peak_memory_gb=peak_memory_gb(self.engine.device))
        self.global_step = step + 1
        return metrics

    def train(self) -> dict:
        """The run: ``num_training_steps`` optimizer steps (from the resumed checkpoint's with
        ``resume_from_checkpoint``), then the final evaluation and the model saved to ``output_dir``.
        Returns ``train_loss`` (mean over the steps run), ``train_runtime``, ``steps`` and the final
        evaluation's metrics."""
        args = self.args
        set_seed(args.seed)  # the run repeats whatever ran between construction and train()
        start = self.start_run(args.resume_from_checkpoint)
        loop = Loop(args.output_dir, self.num_training_steps, start, report_to=args.report_to,
                    show_bar=not args.disable_tqdm, device=self.engine.device)
        self.logger = loop.logger
        began, losses = time.perf_counter(), []

        def step(k: int) -> list[tuple[int, dict]]:
            metrics = self.train_step(k)
            losses.append(metrics["loss"])
            return [(self.global_step, metrics)]

        self.model.train()
        try:
            final = loop.run(step, Cadence(args.logging_steps, args.eval_steps, args.save_steps),
                             evaluate=self.evaluate, save=self.save_checkpoint,
                             finish=lambda: self.save_model(args.output_dir))
        finally:
            self.logger = None
        return {"train_loss": sum(losses) / len(losses) if losses else float("nan"),
                "train_runtime": time.perf_counter() - began, "steps": self.num_training_steps - start, **final}
