"""The one training loop every fastalign algorithm (except PPO and DDPO's outer loop) runs on.

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
import time
from pathlib import Path
from typing import TypeVar

import torch
from transformers import set_seed

from fastalign.data import PackedBatch, plan_units
from fastalign.data.store import Batches, Stream, StreamBatches, TokenStore

from . import checkpoint as ckpt
from . import distributed
from .config import TrainingConfig
from .engine import Engine
from .metrics import MetricsLogger

T = TypeVar("T")


class Checkpointing:
    """Saving the trained model, and checkpoints a killed run resumes from: the model, the
    optimizer and schedule (DeepSpeed's own checkpoint under DeepSpeed), each process's RNG state
    and whatever ``extra_state`` adds. Needs ``args``, ``engine``, ``model``, ``tokenizer``,
    ``global_step`` and ``logger``."""

    def extra_state(self) -> dict:
        """Algorithm state a resumed run needs besides the model and optimizer."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def save_model(self, output_dir) -> None:
        """The trained model (and tokenizer) in Hugging Face format; every process calls it (ZeRO-3
        gathers the shards), the main one writes."""
        state = distributed.full_state_dict(self.engine) if self.engine.deepspeed is not None else None
        if distributed.is_main():
            ckpt.save_hf(output_dir, self.model, self.tokenizer, state)
        distributed.barrier()

    def save_checkpoint(self) -> Path:
        ds = self.engine.deepspeed
        if ds is None:
            state, full, extra = {"optimizer": self.engine.optimizer.state_dict(),
                                  "scheduler": self.engine.lr_scheduler.state_dict()}, None, None
        else:  # DeepSpeed keeps the (sharded) optimizer and the schedule in its own checkpoint
            state, full = {}, distributed.full_state_dict(self.engine)
            extra = lambda tmp: ds.save_checkpoint(str(tmp / "deepspeed"), tag="state")  # noqa: E731
        state.update(self.extra_state())
        path = ckpt.save_checkpoint(
            self.args.output_dir, self.global_step, self.model, self.tokenizer, state, self.args.save_total_limit,
            state_dict=full, write_extra=extra,
        )
        if self.logger is not None:  # None outside train(): a checkpoint saved by hand
            self.logger.write(f"saved {path}")
        return path

    def _resume(self) -> int:
        target = self.args.resume_from_checkpoint
        path = ckpt.latest_checkpoint(self.args.output_dir) if target is True else Path(target)
        if path is None or not path.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint={target!r}: no checkpoint found (output_dir={self.args.output_dir})")
        state = ckpt.load_trainer_state(path)
        if self.engine.deepspeed is None:
            ckpt.load_model_weights(self.model, path)
            self.engine.optimizer.load_state_dict(state["optimizer"])
            self.engine.lr_scheduler.load_state_dict(state["scheduler"])
        else:
            if not (path / "deepspeed").is_dir():
                raise FileNotFoundError(f"{path} was written without DeepSpeed; it has no DeepSpeed optimizer states")
            self.engine.deepspeed.load_checkpoint(str(path / "deepspeed"), tag="state")
        ckpt.set_rng_state(state["rng"])
        self.load_extra_state(state)
        self.global_step = state["step"]
        return state["step"]


class LossPasses(Checkpointing):
    """An algorithm's loss run over packed micro-batches, shared by ``Trainer`` and the trainers the
    caller drives step by step (``IterativeSFTTrainer``): the algorithm supplies ``compute_loss``
    (and ``batch_weight`` when its sums count something else than loss tokens), ``_pass`` runs
    them. Needs ``engine`` and ``global_step`` besides what ``Checkpointing`` needs."""

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
                totals["_real_tokens"] += int(batch.cu_seqlens[-1])
            # Every process all-reduces the same keys: a weight-0 copy adds zeros.
            for key, value in batch_sums.items():
                totals[key] = totals.get(key, 0.0) + (float(value) if counts else 0.0)
        keys = sorted(totals)
        return dict(zip(keys, distributed.all_reduce_sum([totals[k] for k in keys], self.engine.device)))


class Trainer(LossPasses):
    def __init__(self, model, args: TrainingConfig, train_data: TokenStore | Stream,
                 eval_data: TokenStore | None = None, tokenizer=None, optimizers=(None, None)):
        self.streamed = isinstance(train_data, Stream)
        if self.streamed and args.max_steps <= 0:
            raise ValueError("a streamed training set has no known length: set max_steps")
        if isinstance(eval_data, Stream):
            raise ValueError("the evaluation set cannot be streamed: give a Dataset, a list or a file")
        if not self.streamed and len(train_data.kept) == 0:
            raise ValueError("the training set is empty (after tokenization and truncation)")
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
        self.global_step = 0  # optimizer steps done
        self.logger = None

    # ---- what an algorithm supplies (with compute_loss and batch_weight) ------------------------
    def plan(self, store: TokenStore) -> list:
        """The micro-batches of an epoch as lists of units (store rows): best-fit decreasing into
        ``max_tokens_per_batch``, from the lengths alone."""
        kept, budget = store.kept, self.args.max_tokens_per_batch
        lengths = store.lengths[kept]
        if len(lengths) and lengths.max() > budget:
            row = int(kept[lengths.argmax()])
            both = " (its two halves)" if len(store.halves) == 2 else ""
            raise ValueError(f"row {row} has {int(lengths.max())} tokens{both}, more than max_tokens_per_batch="
                             f"{budget}: raise it{' to at least 2 x max_length' if both else ''}, or lower max_length")
        return [kept[units] for units in plan_units(lengths, budget)]

    def make_batches(self, data: TokenStore | Stream) -> Batches | StreamBatches:
        if isinstance(data, Stream):
            return StreamBatches(data.rows, data.encode, data.halves, self.plan,
                                 self.args.stream_window_rows, self.args.seed if self.args.shuffle else None)
        return Batches(data, self.plan(data))

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
            raise ValueError(f"step {self.global_step}: its micro-batches carry no loss (weight 0)")
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
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            sums = self._pass(self._my_share(list(range(len(self.eval_batches)))), source=self.eval_batches)
        self.model.train(was_training)
        weight = sums.pop("_weight")
        for key in ("_tokens", "_real_tokens"):
            del sums[key]
        out = {"eval/loss": sums.pop("_loss") / weight}
        out.update({f"eval/{k}": v / weight for k, v in sums.items()})
        return out

    def train(self) -> dict:
        args = self.args
        set_seed(args.seed)  # the run repeats whatever ran between construction and train()
        start = self._resume() if args.resume_from_checkpoint else 0
        self.logger = MetricsLogger(
            args.output_dir, self.num_training_steps, start, args.report_to, enabled=distributed.is_main(),
            show_bar=not args.disable_tqdm,
        )
        self.model.train()
        window, began, losses = [], time.perf_counter(), []
        try:
            for step in range(start, self.num_training_steps):
                self.global_step = step
                t0 = time.perf_counter()
                lr = self.engine.lr
                metrics = self._run_step(self.step_plan(step))
                metrics["grad_norm"] = self.engine.step()
                seconds = time.perf_counter() - t0
                epoch = self.train_batches.epoch if self.streamed else (step + 1) / self.steps_per_epoch
                metrics.update(lr=lr, epoch=epoch, seconds_per_step=seconds,
                               tokens_per_s=metrics["num_tokens"] / seconds, peak_memory_gb=peak_memory_gb(self.engine.device))
                self.global_step = done = step + 1
                losses.append(metrics["loss"])
                window.append(metrics)
                if done % args.logging_steps == 0 or done == self.num_training_steps:
                    self.logger.log(done, _mean(window))
                    window = []
                if args.eval_steps and done % args.eval_steps == 0 and done < self.num_training_steps:
                    self.logger.log(done, self.evaluate())
                if args.save_steps and done % args.save_steps == 0:
                    self.save_checkpoint()
                self.logger.advance()
            final = self.evaluate()
            if final:
                self.logger.log(self.num_training_steps, final)
            self.save_model(args.output_dir)
        finally:
            self.logger.close()
        runtime = time.perf_counter() - began
        return {"train_loss": sum(losses) / len(losses) if losses else float("nan"), "train_runtime": runtime,
                "steps": self.num_training_steps - start, **final}

def peak_memory_gb(device) -> float:
    """The run's peak memory so far: allocated on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _mean(records: list[dict]) -> dict:
    """Metrics over a logging window: means, except the position in the run (last value)."""
    last = ("lr", "epoch", "peak_memory_gb")
    return {k: records[-1][k] if k in last else sum(r[k] for r in records) / len(records) for k in records[0]}
