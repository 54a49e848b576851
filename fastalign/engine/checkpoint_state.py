"""What a checkpoint's state files hold, and how they are read back without running any code.

``trainer_state.json`` holds the plain part (the step, the run that wrote it); ``trainer_state.pt``
and ``rng_rankR.pt`` hold tensors and plain values only (numbers, strings, lists, tuples, dicts),
read with ``torch.load(weights_only=True)``: a file holding any other Python object is refused,
since unpickling it could run code. DeepSpeed reads its own files in ``deepspeed/`` with full
unpickling, so they are read here first the same way (with DeepSpeed's plain records allowed).
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from fastalign.errors import CheckpointError

from . import distributed

STATE_FILE = "trainer_state.pt"
PLAIN_STATE_FILE = "trainer_state.json"


def rng_state() -> dict:
    """Every random generator's state as tensors and plain values (numpy's as a tensor of its keys)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_run(checkpoint: Path) -> dict:
    """``trainer_state.json`` of ``checkpoint``: its ``step`` and the ``run`` that wrote it."""
    path = Path(checkpoint) / PLAIN_STATE_FILE
    try:
        plain = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a complete fastalign checkpoint ({err})") from None
    if not isinstance(plain, dict):
        raise CheckpointError(f"{path}: expected a JSON object with 'step' and 'run', found {type(plain).__name__}")
    step, run = plain.get("step"), plain.get("run", {})
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: 'step' must be a whole number >= 0, found {step!r}")
    if not isinstance(run, dict):
        raise CheckpointError(f"{path}: 'run' must be a JSON object, found {run!r}")
    return plain


def load_tensors(path: Path, map_location=None):
    """What ``torch.save`` wrote in ``path``, read with ``weights_only=True``: tensors and plain values
    only, so nothing in the file runs."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: holds a Python object{_named(err)} where tensors and plain values were "
                              "expected; fastalign runs no code from a checkpoint, so it is refused") from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: cannot be read ({str(err).splitlines()[0]})") from None


def check_plain(state: dict, what: str) -> None:
    """Refuse to save ``state`` (``what`` names it) unless it reads back with ``weights_only=True``:
    no checkpoint is written that a resume would refuse."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError as err:
        raise TypeError(f"{what} holds a Python object{_named(err)} a checkpoint cannot keep: give tensors and "
                        "plain values (numbers, strings, lists, tuples, dicts)") from None


def _named(err: pickle.UnpicklingError) -> str:
    """The object ``weights_only`` refused, as `` (module.name)``, from its message."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f" ({found.group(1)})" if found else ""


def load_trainer_state(checkpoint: Path) -> dict:
    """The step, the run that wrote it (``run``), the optimizer and schedule states and this
    process's RNG state (under ``"rng"``)."""
    checkpoint = Path(checkpoint)
    plain = read_run(checkpoint)
    state = load_tensors(checkpoint / STATE_FILE)
    rng = checkpoint / f"rng_rank{distributed.rank()}.pt"
    if not rng.exists():
        raise FileNotFoundError(f"{checkpoint} has no RNG state for process {distributed.rank()}: "
                                "was it written by fewer processes?")
    return {**state, "step": plain["step"], "run": plain.get("run", {}), "rng": load_tensors(rng)}


def deepspeed_records() -> list:
    """The plain records DeepSpeed keeps in its checkpoints besides tensors (the ZeRO stage, loss
    scalers, fragment addresses): classes built from their values alone, nothing run."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def check_deepspeed_files(folder: Path) -> None:
    """Read this process's share of DeepSpeed's checkpoint files in ``folder`` the safe way before
    DeepSpeed reads them its own (unsafe) way: each holds tensors, plain values and DeepSpeed's
    plain records only, or a ``CheckpointError`` names it."""
    files = sorted(Path(folder).rglob("*.pt"))
    with torch.serialization.safe_globals(deepspeed_records()):
        for path in files[distributed.rank()::distributed.world_size()]:
            load_tensors(path, map_location="cpu")
