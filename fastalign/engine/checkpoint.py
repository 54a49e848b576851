"""Checkpoints: the model in Hugging Face format plus everything an exact resume needs.

A checkpoint is ``OUTPUT_DIR/checkpoint-STEP/`` holding the model (``save_pretrained``, safetensors;
only the adapters for a PEFT model), the tokenizer when there is one, ``trainer_state.pt``
(optimizer, schedule, step), one ``rng_rankR.pt`` per process, and under DeepSpeed its own
sharded optimizer states in ``deepspeed/``. It is written into a temporary folder first and renamed
into place in one ``os.replace``: a run killed mid-save leaves the previous checkpoints intact and
no half-written ``checkpoint-*`` folder. Older checkpoints beyond ``save_total_limit`` are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from fastalign.models.loading import load_model_weights  # noqa: F401  (the checkpoint API: models load themselves)

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


def save_checkpoint(output_dir, step: int, model, tokenizer, trainer_state: dict, save_total_limit=None,
                    state_dict=None, write_extra=None) -> Path:
    """Write ``checkpoint-{step}`` atomically; returns its path.

    With several processes every one calls this: the main one writes the model (``state_dict``,
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
            save_hf(tmp, model, tokenizer, state_dict)
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
