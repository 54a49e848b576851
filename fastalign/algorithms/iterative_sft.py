"""Iterative SFT: fine-tuning steps driven by the caller, for methods that alternate generation and
training (rejection sampling, expert iteration, best-of-n distillation).

There is no dataset and no ``train()``: the caller generates, filters, then hands the kept rows to
``IterativeSFTTrainer.step`` and gets the step's stats back::

    trainer = IterativeSFTTrainer(model, IterativeSFTConfig(output_dir="runs/rs", learning_rate=1e-4), tokenizer)
    for round in range(rounds):
        prompts, answers = sample_and_keep_the_best(model)       # the caller's own loop
        stats = trainer.step(texts=prompts, texts_labels=answers)
    trainer.save_model("runs/rs")

A row is given in one of three ways:

- ``input_ids`` (1-D tensors or lists of ids, or a 2-D tensor) with optional ``attention_mask`` and
  ``labels``: tokens where the mask is 0 are padding and are dropped (left, right or both sides; the
  attended tokens must be one contiguous run); ``labels`` follow Hugging Face's convention (same
  length as ``input_ids``, ``labels[t]`` is the target predicted before token t, -100 for no loss).
  Without ``labels`` every attended token is a target (causal language modeling).
- ``texts``: each text tokenized with special tokens and the end-of-sequence token appended (as
  ``SFTTrainer`` tokenizes ``text`` rows); every token is a target.
- ``texts`` with ``texts_labels``: each text is a prompt and its label the completion to learn.
  The row is the prompt's tokens (with special tokens), then the completion's (without), then the
  end-of-sequence token; only the completion and that end token are targets (as ``SFTTrainer``
  tokenizes ``prompt``/``completion`` rows). An empty label trains the model to stop right there.

Each sequence longer than ``max_length`` is cut to its last (``truncation_mode="keep_end"``, the
default) or first (``"keep_start"``) ``max_length`` tokens. A row left with no target is dropped.
Both are counted in the stats (``truncated``, ``dropped``), never silent.

Rows are packed padding-free (best-fit into micro-batches of at most ``max_tokens_per_batch``
tokens, positions restarting per sequence) and the lm_head runs only at target positions, through
the fused log-prob kernel. The loss of an optimizer step is the mean negative log-likelihood over
every target token of the step, however its rows are split into micro-batches.

Optimizer steps: with ``per_device_train_batch_size=None`` (the default) one ``step`` call is one
optimizer step over all its rows. With ``per_device_train_batch_size=B`` the rows are shuffled
(``shuffle``, seeded by ``seed``) and cut into mini-batches of B rows, and each optimizer step
takes ``gradient_accumulation_steps`` of them: ``ceil(rows / (B x gradient_accumulation_steps))``
optimizer steps per call, TRL's counting. The schedule (``lr_scheduler_type``, warmup) runs over
``max_steps`` optimizer steps when it is set; otherwise the rate is constant after
``warmup_steps``. ``optimizers=(optimizer, scheduler)`` replace either.

Stats of a call: ``loss`` (mean over its target tokens, before each step's update), ``learning_rate``
(the last optimizer step's), ``grad_norm`` (before clipping, mean over the call's optimizer steps),
``optimizer_steps``, ``rows``, ``truncated``, ``dropped``, ``num_tokens``, ``num_loss_tokens``
(counts over all processes), ``seconds``, ``tokens_per_s``. Each call's stats are appended to
``output_dir/metrics.jsonl`` (and TensorBoard with ``report_to``) at the optimizer step reached;
``save_steps`` writes checkpoints that ``resume_from_checkpoint`` resumes (model, optimizer,
schedule, RNG, shuffle state); ``save_model(dir)`` saves the model in Hugging Face format.

With several processes each calls ``step`` with its own rows (like ``PPOTrainer.step``); every
optimizer step averages over all processes' target tokens, and under ZeRO every process runs as
many forwards as the others (weight-0 copies fill in).

Differences from TRL 0.7.10's ``IterativeSFTTrainer``, on purpose:

- ``labels`` are used. TRL's causal-LM path discards them (its collator rebuilds labels from
  ``input_ids``, masking every token equal to the pad token, an end-of-sequence token included when
  they share an id); here padding is what ``attention_mask`` says.
- ``texts_labels`` are completions of ``texts``. TRL tokenizes ``texts`` a second time in their
  place, so they have no effect.
- ``max_length`` cuts each sequence. TRL slices the batch dimension of ``input_ids`` (it keeps the
  first or last ``max_length`` rows, of any length).
- Giving both ``input_ids`` and ``texts`` is an error (TRL warns and uses ``texts``); texts get the
  end-of-sequence token (TRL adds none).
- An optimizer step's loss is the mean over all its target tokens; with gradient accumulation
  TRL averages the accumulated mini-batches' own means (the tokens of short mini-batches then
  weigh more).
- One optimizer step per call by default (TRL: mini-batches of ``per_device_train_batch_size``,
  8 by default); without ``max_steps`` the rate is constant (TRL requires ``max_steps`` or a
  scheduler).
- Left padding does not shift positions: every sequence starts at position 0.
- Causal LMs only (TRL also takes encoder-decoder models).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed

from fastalign.data import IGNORE_INDEX, PackedBatch, Sequence, pack, plan_batches
from fastalign.data.rows import Texts, check_truncation, kept_part, with_eos
from fastalign.engine import Engine, TrainingConfig, distributed
from fastalign.engine.checkpoint import Checkpointed, Checkpointer, hf_weights
from fastalign.engine.metrics import MetricsLogger
from fastalign.engine.trainer import LossPasses
from fastalign.models import load_model, packed_logprobs, prepare_model, train_mode
from fastalign.options import option

# Token rows as step() takes them: a 2-D tensor, or a list of 1-D tensors or of id lists.
Tokens = torch.Tensor | list


@dataclass
class IterativeSFTConfig(TrainingConfig):
    """The engine's options plus ``per_device_train_batch_size``: rows per mini-batch (an optimizer
    step every ``gradient_accumulation_steps`` of them), or None for one optimizer step per call."""

    per_device_train_batch_size: int | None = option(None, "rows per mini-batch (null: one optimizer step per "
                                                     "call)", ge=1)


@dataclass
class _Row:
    index: int  # position in the caller's lists
    ids: list[int]
    labels: list[int]  # Hugging Face convention: labels[t] is predicted at position t - 1

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


class IterativeSFTTrainer(LossPasses, Checkpointed):
    model_loader = staticmethod(load_model)
    peft_task_type = "CAUSAL_LM"

    def __init__(self, model, args: TrainingConfig | None = None, tokenizer=None, optimizers=(None, None),
                 data_collator=None, max_length: int | None = None, truncation_mode: str = "keep_end", *,
                 peft_config=None):
        args = args or IterativeSFTConfig()
        if data_collator is not None:
            raise ValueError("data_collator: fastalign packs rows without padding and takes no collator; give "
                             "labels (-100 where no loss) or attention_mask to step() instead")
        check_truncation(max_length, truncation_mode)
        self.args, self.max_length, self.truncation_mode = args, max_length, truncation_mode
        self.batch_size = getattr(args, "per_device_train_batch_size", None)
        set_seed(args.seed)
        model, tokenizer, self.attention = prepare_model(model, tokenizer, peft_config, self.model_loader)
        self.model, self.tokenizer = model, tokenizer
        # Without max_steps the run's length is unknown: the rate is constant after the warmup.
        self.engine = Engine(model, args, args.max_steps if args.max_steps > 0 else None, *optimizers)
        self.optimizer, self.lr_scheduler = self.engine.optimizer, self.engine.lr_scheduler
        self.checkpointer = Checkpointer(self.engine, args.output_dir, hf_weights(model, tokenizer), self.extra_state,
                                         self.load_extra_state, args.save_total_limit,
                                         overwrite=args.overwrite_output_dir)
        self.world_size = distributed.world_size()
        self.generator = torch.Generator().manual_seed(args.seed)
        self.global_step = 0  # optimizer steps done
        self.start_run(args.resume_from_checkpoint)  # before the logger starts metrics.jsonl
        self.logger = MetricsLogger(args.output_dir, max(args.max_steps, 0), self.global_step, args.report_to,
                                    enabled=distributed.is_main(), show_bar=False)

    # ---- inputs to rows -------------------------------------------------------------------------
    def _rows(self, input_ids, attention_mask, labels, texts, texts_labels) -> list[_Row]:
        if input_ids is not None and texts is not None:
            raise ValueError("step: give input_ids or texts, not both")
        if input_ids is None and texts is None:
            raise ValueError("step: give input_ids (with optional attention_mask and labels) or texts (with optional "
                             "texts_labels)")
        if texts is not None:
            if attention_mask is not None or labels is not None:
                raise ValueError("step: attention_mask and labels go with input_ids; with texts give texts_labels")
            return self._text_rows(texts, texts_labels)
        if texts_labels is not None:
            raise ValueError("step: texts_labels go with texts; with input_ids give labels")
        ids = _id_lists("input_ids", input_ids)
        masks = _id_lists("attention_mask", attention_mask, len(ids)) if attention_mask is not None else None
        labs = _id_lists("labels", labels, len(ids)) if labels is not None else None
        vocab = _vocab_size(self.model)
        rows = []
        for i, row in enumerate(ids):
            _check_ids(i, "input_ids", row, vocab)
            target = row
            if labs is not None:
                if len(labs[i]) != len(row):
                    raise ValueError(f"row {i}: input_ids has {len(row)} tokens but labels has {len(labs[i])}")
                target = labs[i]
                _check_ids(i, "labels", [t for t in target if t != IGNORE_INDEX], vocab)
            if masks is not None:
                start, stop = _attended(i, masks[i], len(row))
                row, target = row[start:stop], target[start:stop]
            rows.append(_Row(i, list(row), list(target)))
        return rows

    def _text_rows(self, texts, texts_labels) -> list[_Row]:
        """Rows tokenized as ``SFTTrainer`` tokenizes ``text`` rows, or ``prompt``/``completion`` rows
        with ``texts_labels`` (an empty completion: only the end-of-sequence token is a target)."""
        texts = _strings("texts", texts, allow_empty=False)
        completions = None
        if texts_labels is not None:
            completions = _strings("texts_labels", texts_labels, allow_empty=True, count=len(texts))
        batch = Texts()  # every text in one tokenizer call per kind
        slots = [(batch.add(text, True), batch.add(completions[i], False) if completions and completions[i] else None)
                 for i, text in enumerate(texts)]
        batch.encode(self.tokenizer)
        rows = []
        for i, (prompt_slot, completion_slot) in enumerate(slots):
            prompt = batch[prompt_slot]
            completion = batch[completion_slot] if completion_slot is not None else []
            ids = with_eos(self.tokenizer, prompt + completion)
            target = ids if completions is None else [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
            rows.append(_Row(i, ids, target))
        return rows

    def _truncate(self, rows: list[_Row]) -> int:
        n, cut = self.max_length, 0
        for row in rows:
            if n is not None and len(row.ids) > n:
                part = kept_part(len(row.ids), n, self.truncation_mode)
                row.ids, row.labels, cut = row.ids[part], row.labels[part], cut + 1
        return cut

    # ---- rows to optimizer steps ----------------------------------------------------------------
    def _groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """The rows of each optimizer step of this call."""
        if self.batch_size is None or not rows:
            return [rows]
        order = range(len(rows))
        if self.args.shuffle:
            order = torch.randperm(len(rows), generator=self.generator).tolist()
        per_step = self.batch_size * self.args.gradient_accumulation_steps
        shuffled = [rows[i] for i in order]
        return [shuffled[k:k + per_step] for k in range(0, len(shuffled), per_step)]

    def _micro_batches(self, rows: list[_Row]) -> list[PackedBatch]:
        plan = plan_batches([len(r.ids) for r in rows], self.args.max_tokens_per_batch)
        return [_pack([rows[i] for i in batch]) for batch in plan]

    def compute_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        return -packed_logprobs(self.model, batch).sum(), {}

    # ---- the step -------------------------------------------------------------------------------
    def step(self, input_ids: Tokens | None = None, attention_mask: Tokens | None = None, labels: Tokens | None = None,
             texts: list[str] | None = None, texts_labels: list[str] | None = None) -> dict:
        """Fine-tune on the given rows: one optimizer step, or one per ``per_device_train_batch_size
        x gradient_accumulation_steps`` rows when that is set. Returns the stats (see the module)."""
        began = time.perf_counter()
        rows = self._rows(input_ids, attention_mask, labels, texts, texts_labels)
        if not rows:
            raise ValueError("step: no rows (empty input_ids or texts)")
        truncated = self._truncate(rows)
        kept = [r for r in rows if r.loss_tokens > 0]
        for r in kept:
            if len(r.ids) > self.args.max_tokens_per_batch:
                raise ValueError(f"row {r.index} has {len(r.ids)} tokens, more than max_tokens_per_batch="
                                 f"{self.args.max_tokens_per_batch}: raise it or set max_length")
        device = self.engine.device
        groups = [self._micro_batches(g) if g else [] for g in self._groups(kept)]
        # Every process runs as many optimizer steps, and forwards per step, as the busiest one.
        steps = distributed.all_reduce_max(len(groups), device)
        groups += [[]] * (steps - len(groups))
        weights = distributed.all_reduce_sum([sum(b.num_loss_tokens for b in g) for g in groups], device)
        if not all(weights):
            where = f"none of the {len(rows)} rows has" if self.world_size == 1 else "no process has a row with"
            raise ValueError(f"step: {where} a target token (labels all -100, or a single token, after truncation)")
        filler = next((g[0] for g in groups if g), None) or _pack([_Row(0, rows[0].ids, rows[0].ids)])

        sums, norms = [], []  # per optimizer step (at least one)
        with train_mode(self.model):
            for group, weight in zip(groups, weights):
                count = distributed.all_reduce_max(len(group), device)
                lr = self.engine.lr
                sums.append(self._pass([(b, True) for b in group] + [(filler, False)] * (count - len(group)), weight))
                norms.append(self.engine.step())
                self.global_step += 1
        n_rows, truncated, dropped = distributed.all_reduce_sum([len(rows), truncated, len(rows) - len(kept)], device)
        tokens, loss_tokens = sum(s["_tokens"] for s in sums), sum(weights)
        seconds = time.perf_counter() - began
        stats = {
            "loss": sum(s["_loss"] for s in sums) / loss_tokens, "learning_rate": lr,
            "grad_norm": sum(norms) / len(norms), "optimizer_steps": len(norms), "rows": int(n_rows),
            "truncated": int(truncated), "dropped": int(dropped), "num_tokens": int(tokens),
            "num_loss_tokens": int(loss_tokens), "seconds": seconds, "tokens_per_s": tokens / seconds,
        }
        self._after_step(stats, len(norms))
        return stats

    def _after_step(self, stats: dict, done: int) -> None:
        args = self.args
        if args.max_steps > 0 and self.global_step > args.max_steps and self.global_step - done <= args.max_steps:
            warnings.warn(f"optimizer step {self.global_step} is past max_steps={args.max_steps}: the learning-rate "
                          "schedule has ended (raise max_steps)", stacklevel=3)
        self.logger.log(self.global_step, stats)
        if args.save_steps and self.global_step // args.save_steps > (self.global_step - done) // args.save_steps:
            self.save_checkpoint()

    # ---- saving and checkpoints ----------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """``checkpoint-{global_step}`` in ``output_dir``: what ``resume_from_checkpoint`` restores."""
        path = super().save_checkpoint()
        self.logger.write(f"saved {path}")
        return path

    def extra_state(self) -> dict:
        return {"iterative_sft": {"generator": self.generator.get_state()}}

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["iterative_sft"]["generator"])


def _pack(rows: list[_Row]) -> PackedBatch:
    """One packed row whose labels are the rows' own (shifted: position t predicts labels[t + 1])."""
    batch = pack([[Sequence(r.ids)] for r in rows])
    batch.labels = torch.tensor([label for r in rows for label in r.labels[1:] + [IGNORE_INDEX]])
    return batch


def _id_lists(name: str, value, count: int | None = None) -> list[list[int]]:
    """A list of 1-D tensors, lists of ints or a 2-D tensor, as lists of ints."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 2:
            raise ValueError(f"{name}: a tensor must be 2-D [rows, tokens], got shape {tuple(value.shape)}")
        value = list(value)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list of 1-D tensors or of lists of ints, got {type(value).__name__}")
    if count is not None and len(value) != count:
        raise ValueError(f"{name} has {len(value)} rows but input_ids has {count}")
    out = []
    for i, row in enumerate(value):
        if isinstance(row, torch.Tensor):
            if row.ndim != 1 or row.is_floating_point():
                raise ValueError(f"row {i}, column {name!r}: expected a 1-D integer tensor, got {row.dtype} of shape "
                                 f"{tuple(row.shape)}")
            row = row.tolist()
        elif not isinstance(row, (list, tuple)) or not all(isinstance(t, int) for t in row):
            raise ValueError(f"row {i}, column {name!r}: expected a 1-D tensor or a list of ints")
        if not row:
            raise ValueError(f"row {i}, column {name!r}: empty")
        out.append(list(row))
    return out


def _check_ids(i: int, name: str, ids: list[int], vocab: int | None) -> None:
    bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise ValueError(f"row {i}, column {name!r}: id {bad[0]} is outside the vocabulary [0, {vocab})"
                         + (" (-100 means no loss)" if name == "labels" else ""))


def _attended(i: int, mask: list[int], length: int) -> tuple[int, int]:
    """``(start, stop)`` of the row's attended tokens, which must be one contiguous run."""
    if len(mask) != length:
        raise ValueError(f"row {i}: input_ids has {length} tokens but attention_mask has {len(mask)}")
    if any(m not in (0, 1) for m in mask):
        raise ValueError(f"row {i}, column 'attention_mask': expected 0 or 1 per token")
    on = [t for t, m in enumerate(mask) if m]
    if not on:
        raise ValueError(f"row {i}, column 'attention_mask': attends to no token")
    if on[-1] - on[0] + 1 != len(on):
        raise ValueError(f"row {i}, column 'attention_mask': the attended tokens must be one contiguous run (padding "
                         "on the left and/or right only)")
    return on[0], on[-1] + 1


def _strings(name: str, value, allow_empty: bool, count: int | None = None) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list of strings, got {type(value).__name__}")
    if count is not None and len(value) != count:
        raise ValueError(f"texts_labels has {len(value)} rows but texts has {count}")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise ValueError(f"row {i}, column {name!r}: expected a string, got {type(text).__name__}")
        if not text and not allow_empty:
            raise ValueError(f"row {i}, column {name!r}: empty")
    return list(value)


def _vocab_size(model) -> int | None:
    embeddings = model.get_input_embeddings()
    return getattr(embeddings, "num_embeddings", None)


__all__ = ["IterativeSFTConfig", "IterativeSFTTrainer"]
