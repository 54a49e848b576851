"""Checkpoints: the model in Hugging Face format plus everything an exact resume needs.

A checkpoint is ``OUTPUT_DIR/checkpoint-STEP/`` holding the model (``save_pretrained``, safetensors;
only the adapters for a PEFT model), the tokenizer when there is one, ``trainer_state.json`` (the
step and what run wrote it: its model, data and length), ``trainer_state.pt`` (optimizer, schedule
and the trainer's own state: tensors and plain values), one ``rng_rankR.pt`` per process, and under
DeepSpeed its own sharded optimizer states in ``deepspeed/``. The ``.pt`` files are read with
``torch.load(weights_only=True)``: a checkpoint holding any other Python object is refused, so
resuming never runs code from a checkpoint. It is written into a temporary folder first and renamed
into place in one ``os.replace``: a run killed mid-save leaves the previous checkpoints intact and
no half-written ``checkpoint-*`` folder. Older checkpoints beyond ``save_total_limit`` are removed.

An output folder belongs to one run. A new run refuses a folder where another run left checkpoints,
a model or metrics (``overwrite_output_dir`` deletes the old checkpoints first instead), and a
resume refuses a checkpoint written for another model or data set, or past the end of the run.

A trainer composes a ``Checkpointer``: it hands over the engine, how its weights are written and
read (``Weights``; ``hf_weights`` for a Hugging Face model) and its own state to keep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastalign.errors import CheckpointError
from fastalign.models.loading import load_model_weights

from . import distributed
from .checkpoint_state import (
    PLAIN_STATE_FILE,
    STATE_FILE,
    check_deepspeed_files,
    check_plain,
    load_trainer_state,
    read_run,
    rng_state,
    set_rng_state,
)
from .metrics import METRICS_FILE

_NAME = re.compile(r"^checkpoint-(\d+)$")
# What a run leaves in its output_dir besides checkpoints: its saved model (Hugging Face, PEFT,
# diffusers, DDPO's LoRA file) and its metrics.
RUN_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "model_index.json",
             "pytorch_lora_weights.safetensors", METRICS_FILE)
# The parts of a run a checkpoint must share with the run resuming it.
MATCHED = ("model", "data")


def checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def run_traces(output_dir) -> list[str]:
    """What runs left in ``output_dir``: its checkpoints, then a saved model or logged metrics."""
    root = Path(output_dir)
    found = [p.name for p in checkpoints(root)]
    return found + [name for name in RUN_FILES if (root / name).is_file() and (root / name).stat().st_size]


def model_fingerprint(model: torch.nn.Module) -> str:
    """The model as a checkpoint records it: its class and its parameters' names and shapes (the
    whole shapes under ZeRO-3), as one short line."""
    shapes = [(name, tuple(getattr(p, "ds_shape", p.shape))) for name, p in model.named_parameters()]
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:12]
    return f"{type(model).__name__}, {sum(math.prod(s) for _, s in shapes)} parameters in {len(shapes)} tensors ({digest})"


@contextlib.contextmanager
def quiet_transformers():
    """No per-shard progress bar from ``save_pretrained`` under the run's own bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_hf(folder, model, tokenizer, state_dict=None) -> None:
    """The model (safetensors) and tokenizer in Hugging Face format, without transformers' bars."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)


@dataclass(frozen=True)
class Weights:
    """How checkpoints write and read the trained weights: ``save(folder, state_dict)`` (the full
    state dict gathered under ZeRO-3, else None: read the model) and ``load(folder)``."""

    save: Callable[[Path, dict | None], None]
    load: Callable[[Path], None]


def hf_weights(model, tokenizer=None) -> Weights:
    """A Hugging Face model's weights (safetensors; only the adapters of a PEFT model), saved with
    its tokenizer so a checkpoint folder loads with ``from_pretrained``."""
    return Weights(lambda folder, state_dict: save_hf(folder, model, tokenizer, state_dict),
                   lambda folder: load_model_weights(model, folder))


def save_checkpoint(output_dir, step: int, weights: Weights, trainer_state: dict, save_total_limit: int | None = None,
                    state_dict: dict | None = None, write_extra: Callable[[Path], None] | None = None,
                    run: dict | None = None) -> Path:
    """Write ``checkpoint-{step}`` atomically; returns its path. ``trainer_state``: tensors and plain
    values (what ``torch.load(weights_only=True)`` reads back); ``run``: what run writes it (plain
    values, kept in ``trainer_state.json``).

    With several processes every one calls this: the main one writes the weights (``state_dict``,
    gathered beforehand under ZeRO-3) and renames the folder into place; ``write_extra(tmp)``
    (DeepSpeed's sharded optimizer states) and each process's RNG state are written by all.
    """
    main = distributed.is_main()
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-checkpoint-*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    try:
        if main:
            weights.save(tmp, state_dict)
            torch.save(trainer_state, tmp / STATE_FILE)
        if write_extra is not None:
            write_extra(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{distributed.rank()}.pt")
        distributed.barrier()
        if main:
            (tmp / PLAIN_STATE_FILE).write_text(json.dumps({"step": step, "run": run or {}}, indent=1))
            _fsync_tree(tmp)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        if final.exists():  # a rerun writing the same step: the new one replaces it
            old = root / f".old-checkpoint-{step}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        if save_total_limit:
            for stale in checkpoints(root)[:-save_total_limit]:
                shutil.rmtree(stale)
    distributed.barrier()
    return final


def follow_schedule(scheduler) -> None:
    """Set the rates to ``scheduler``'s at its step (a ``LambdaLR``, as every fastalign schedule): a
    run resumed with another length goes on along its own schedule, not the checkpoint's end."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = lr
        scheduler._last_lr = rates


@dataclass
class Checkpointer:
    """One run's checkpoints, composed into a trainer: the ``weights``, the optimizer and schedule
    (the engine's, or DeepSpeed's own sharded checkpoint), each process's RNG state, and the
    trainer's own ``state()`` (a dict of tensors and plain values, restored by ``load_state``) for
    what else an exact resume needs (data position, controllers, generators).

    The run's ``output_dir`` is its own: ``claim`` (a new run) refuses a folder another run used
    unless ``overwrite`` (``overwrite_output_dir``) and ``resume`` refuses a checkpoint of another
    ``model`` (the engine's) or ``data`` (a short line the trainer gives), or past ``total`` (the
    run's length in steps, when known). ``resume_key`` names the option that resumes, in messages."""

    engine: object  # fastalign.engine.Engine
    output_dir: str | Path
    weights: Weights
    state: Callable[[], dict] = dict
    load_state: Callable[[dict], None] = lambda state: None
    save_total_limit: int | None = None
    data: str | None = None
    overwrite: bool = False
    resume_key: str = "resume_from_checkpoint"
    total: int | None = None
    last_saved: Path | None = field(default=None, init=False)
    owned: bool = field(default=False, init=False)

    def run(self) -> dict:
        """What run this is, as its checkpoints record it (``trainer_state.json``)."""
        return {"model": model_fingerprint(self.engine.model), "data": self.data, "total": self.total}

    def claim(self) -> None:
        """Make ``output_dir`` this run's; every process calls it before the run writes there. A
        folder holding another run's checkpoints, model or metrics is refused, or with ``overwrite``
        its checkpoints are deleted first (so rotation never deletes this run's)."""
        if self.owned:
            return
        root = Path(self.output_dir)
        found = run_traces(root)  # every process looks before the main one changes anything
        distributed.barrier()
        if found and not self.overwrite:
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            raise CheckpointError(f"output_dir {root} holds another run ({', '.join(found[:3])}{more}): resume it with "
                                  f"{self.resume_key}=true, or set overwrite_output_dir=true to start anew there (its "
                                  "checkpoints are deleted), or choose another output_dir")
        if found and distributed.is_main():
            for old in checkpoints(root) + list(root.glob(".tmp-checkpoint-*")) + list(root.glob(".old-checkpoint-*")):
                shutil.rmtree(old)
        distributed.barrier()
        self.owned = True

    def save(self, step: int) -> Path:
        """``checkpoint-{step}`` in ``output_dir``; every process calls it."""
        self.claim()
        ds = self.engine.deepspeed
        if ds is None:
            scheduler = self.engine.lr_scheduler
            state, full, extra = {"optimizer": self.engine.optimizer.state_dict(),
                                  "scheduler": None if scheduler is None else scheduler.state_dict()}, None, None
        else:  # DeepSpeed keeps the (sharded) optimizer and the schedule in its own checkpoint
            state, full = {}, distributed.full_state_dict(self.engine)
            extra = lambda tmp: ds.save_checkpoint(str(tmp / "deepspeed"), tag="state")  # noqa: E731
        own = self.state()
        check_plain(own, "the trainer's state")
        state.update(own)
        self.last_saved = save_checkpoint(self.output_dir, step, self.weights, state, self.save_total_limit,
                                          state_dict=full, write_extra=extra, run=self.run())
        return self.last_saved

    def save_weights(self, folder) -> None:
        """The weights alone into ``folder`` (the final model); every process calls it (ZeRO-3
        gathers the shards), the main one writes."""
        state = distributed.full_state_dict(self.engine) if self.engine.deepspeed is not None else None
        if distributed.is_main():
            self.weights.save(Path(folder), state)
        distributed.barrier()

    def check(self, path: Path, plain: dict) -> None:
        """Refuse checkpoint ``path`` (its ``trainer_state.json``: ``plain``) unless this run wrote it."""
        step, run = plain["step"], plain.get("run", {})
        if self.total is not None and step > self.total:
            raise CheckpointError(f"{path} is at step {step}, past the end of this run (step {self.total}): resume it "
                                  "in a run at least that long, or start this run in another output_dir")
        ours = self.run()
        for key in MATCHED:
            if run.get(key) is not None and ours[key] is not None and run[key] != ours[key]:
                raise CheckpointError(f"{path} was written for another {key} ({run[key]}; this run's: {ours[key]}): "
                                      f"resume it with the {key} of its run, or start this run in another output_dir")

    def read(self, path: Path) -> dict:
        """Checkpoint ``path``'s state files read the safe way, DeepSpeed's too (each process reads
        its own RNG state and its share of DeepSpeed's files); when any process refuses one, every
        process raises, so none waits on the others."""
        refused = None
        try:
            state = load_trainer_state(path)
            if self.engine.deepspeed is not None:
                if not (path / "deepspeed").is_dir():
                    raise FileNotFoundError(f"{path} was written without DeepSpeed; it has no DeepSpeed optimizer states")
                check_deepspeed_files(path / "deepspeed")
        except (CheckpointError, FileNotFoundError) as err:
            refused = err
        if distributed.all_reduce_max(int(refused is not None), self.engine.device):
            raise refused or CheckpointError(f"{path}: another process refused one of its files (its message names it)")
        return state

    def resume(self, target: str | Path | bool) -> int:
        """Restore the checkpoint ``target`` (a folder, or True: the latest in ``output_dir``):
        weights, optimizer, schedule (set to this run's length at the checkpoint's step), RNG and
        the trainer's state; returns its step and says so on the main process."""
        path = latest_checkpoint(self.output_dir) if target is True else Path(target)
        if path is None or not path.is_dir():
            raise FileNotFoundError(f"{self.resume_key}={target!r}: no checkpoint found (output_dir={self.output_dir})")
        self.check(path, read_run(path))
        state = self.read(path)
        engine = self.engine
        if engine.deepspeed is None:
            self.weights.load(path)
            engine.optimizer.load_state_dict(state["optimizer"])
            if engine.lr_scheduler is not None and state["scheduler"] is not None:
                engine.lr_scheduler.load_state_dict(state["scheduler"])
        else:
            engine.deepspeed.load_checkpoint(str(path / "deepspeed"), tag="state")
        follow_schedule(engine.lr_scheduler)
        set_rng_state(state["rng"])
        self.load_state(state)
        self.owned = True
        if distributed.is_main():
            of = f" of {self.total}" if self.total is not None else ""
            print(f"resumed from {path} at step {state['step']}{of}", file=sys.stderr, flush=True)
        return state["step"]


class Checkpointed:
    """Saving and resuming as every trainer offers them, through its ``checkpointer`` and its
    ``global_step`` (the step a checkpoint is named after and a resumed run goes on from)."""

    checkpointer: Checkpointer
    global_step: int

    def save_model(self, output_dir: str | Path) -> None:
        """The trained weights (and tokenizer) in their saved format; every process calls it."""
        self.checkpointer.save_weights(output_dir)

    def save_checkpoint(self) -> Path:
        """``checkpoint-{global_step}`` in ``output_dir``: what an exact resume needs."""
        return self.checkpointer.save(self.global_step)

    def resume(self, target: str | Path | bool) -> int:
        """Restore the checkpoint ``target`` (a folder, or True: the latest in ``output_dir``);
        returns its step, now ``global_step``."""
        self.global_step = self.checkpointer.resume(target)
        return self.global_step

    def start_run(self, target: str | Path | bool | None, fresh: int = 0) -> int:
        """The step a run starts from: the checkpoint ``target``'s (resumed) when given, else
        ``fresh`` in an ``output_dir`` this run claims (``Checkpointer.claim``)."""
        if target:
            return self.resume(target)
        self.checkpointer.claim()
        return fresh
