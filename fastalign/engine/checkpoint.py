"""Checkpoints: the model in Hugging Face format plus everything an exact resume needs.

A checkpoint is ``OUTPUT_DIR/checkpoint-STEP/`` holding the model (``save_pretrained``, safetensors;
only the adapters for a PEFT model), the tokenizer when there is one, ``trainer_state.pt``
(optimizer, schedule, step), one ``rng_rankR.pt`` per process, and under DeepSpeed its own
sharded optimizer states in ``deepspeed/``. It is written into a temporary folder first and renamed
into place in one ``os.replace``: a run killed mid-save leaves the previous checkpoints intact and
no half-written ``checkpoint-*`` folder. Older checkpoints beyond ``save_total_limit`` are removed.

A trainer composes a ``Checkpointer``: it hands over the engine, how its weights are written and
read (``Weights``; ``hf_weights`` for a Hugging Face model) and its own state to keep.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastalign.models.loading import load_model_weights

from . import distributed

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
                    state_dict: dict | None = None, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``checkpoint-{step}`` atomically; returns its path.

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
            torch.save({**trainer_state, "step": step}, tmp / STATE_FILE)
        if write_extra is not None:
            write_extra(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{distributed.rank()}.pt")
        distributed.barrier()
        if main:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}, indent=1))
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


def load_trainer_state(checkpoint: Path) -> dict:
    """The step, optimizer and schedule states, and this process's RNG state (under ``"rng"``)."""
    checkpoint = Path(checkpoint)
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    rng = checkpoint / f"rng_rank{distributed.rank()}.pt"
    if not rng.exists():
        raise FileNotFoundError(f"{checkpoint} has no RNG state for process {distributed.rank()}: "
                                "was it written by fewer processes?")
    state["rng"] = torch.load(rng, weights_only=False)
    return state


@dataclass
class Checkpointer:
    """One run's checkpoints, composed into a trainer: the ``weights``, the optimizer and schedule
    (the engine's, or DeepSpeed's own sharded checkpoint), each process's RNG state, and the
    trainer's own ``state()`` (a dict, restored by ``load_state``) for what else an exact resume
    needs (data position, controllers, generators)."""

    engine: object  # fastalign.engine.Engine
    output_dir: str | Path
    weights: Weights
    state: Callable[[], dict] = dict
    load_state: Callable[[dict], None] = lambda state: None
    save_total_limit: int | None = None
    last_saved: Path | None = field(default=None, init=False)

    def save(self, step: int) -> Path:
        """``checkpoint-{step}`` in ``output_dir``; every process calls it."""
        ds = self.engine.deepspeed
        if ds is None:
            scheduler = self.engine.lr_scheduler
            state, full, extra = {"optimizer": self.engine.optimizer.state_dict(),
                                  "scheduler": None if scheduler is None else scheduler.state_dict()}, None, None
        else:  # DeepSpeed keeps the (sharded) optimizer and the schedule in its own checkpoint
            state, full = {}, distributed.full_state_dict(self.engine)
            extra = lambda tmp: ds.save_checkpoint(str(tmp / "deepspeed"), tag="state")  # noqa: E731
        state.update(self.state())
        self.last_saved = save_checkpoint(self.output_dir, step, self.weights, state, self.save_total_limit,
                                          state_dict=full, write_extra=extra)
        return self.last_saved

    def save_weights(self, folder) -> None:
        """The weights alone into ``folder`` (the final model); every process calls it (ZeRO-3
        gathers the shards), the main one writes."""
        state = distributed.full_state_dict(self.engine) if self.engine.deepspeed is not None else None
        if distributed.is_main():
            self.weights.save(Path(folder), state)
        distributed.barrier()

    def resume(self, target: str | Path | bool) -> int:
        """Restore the checkpoint ``target`` (a folder, or True: the latest in ``output_dir``):
        weights, optimizer, schedule, RNG and the trainer's state; returns its step."""
        path = latest_checkpoint(self.output_dir) if target is True else Path(target)
        if path is None or not path.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint={target!r}: no checkpoint found (output_dir={self.output_dir})")
        state = load_trainer_state(path)
        engine = self.engine
        if engine.deepspeed is None:
            self.weights.load(path)
            engine.optimizer.load_state_dict(state["optimizer"])
            if engine.lr_scheduler is not None and state["scheduler"] is not None:
                engine.lr_scheduler.load_state_dict(state["scheduler"])
        else:
            if not (path / "deepspeed").is_dir():
                raise FileNotFoundError(f"{path} was written without DeepSpeed; it has no DeepSpeed optimizer states")
            engine.deepspeed.load_checkpoint(str(path / "deepspeed"), tag="state")
        set_rng_state(state["rng"])
        self.load_state(state)
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
