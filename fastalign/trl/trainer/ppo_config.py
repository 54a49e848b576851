"""``trl.PPOConfig`` (0.7.10): fastalign's ``PPOConfig`` (the same knobs and defaults) plus TRL's
run-bookkeeping fields. ``log_with="tensorboard"`` reports to TensorBoard (``metrics.jsonl``
always); wandb is not supported (a warning). ``accelerator_kwargs`` may set ``mixed_precision``
("bf16"; "fp16" runs as bf16 autocast, with a warning); ``forward_batch_size`` is TRL's deprecated
name of ``mini_batch_size``; the rest (``tracker_kwargs``, ``project_kwargs``, ...) change nothing."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field

from fastalign.algorithms.ppo import PPOConfig as NativePPOConfig


def _exp_name() -> str:
    return os.path.basename(sys.argv[0])[: -len(".py")] if sys.argv and sys.argv[0].endswith(".py") else "ppo"


def mixed_precision(kwargs: dict, owner: str) -> bool:
    """Whether ``kwargs`` (an Accelerator's) ask for bf16 autocast; warn about the rest."""
    kwargs = dict(kwargs or {})
    precision = kwargs.pop("mixed_precision", "no") or "no"
    if precision == "fp16":
        warnings.warn(f"{owner}: mixed_precision='fp16' runs as bf16 autocast in fastalign", stacklevel=4)
    kwargs.pop("gradient_accumulation_steps", None)
    if kwargs:
        warnings.warn(f"{owner}: accelerator_kwargs {sorted(kwargs)} are ignored by fastalign", stacklevel=4)
    return precision in ("bf16", "fp16")


@dataclass
class PPOConfig(NativePPOConfig):
    exp_name: str = field(default_factory=_exp_name)
    log_with: str | None = None
    task_name: str | None = None
    model_name: str | None = None
    query_dataset: str | None = None
    reward_model: str | None = None
    remove_unused_columns: bool = True
    tracker_kwargs: dict = field(default_factory=dict)
    accelerator_kwargs: dict = field(default_factory=dict)
    project_kwargs: dict = field(default_factory=dict)
    tracker_project_name: str = "trl"
    push_to_hub_if_best_kwargs: dict = field(default_factory=dict)
    forward_batch_size: int | None = None
    optimize_cuda_cache: bool | None = None
    optimize_device_cache: bool | None = False
    compare_steps: int = 1
    is_encoder_decoder: bool | None = None
    is_peft_model: bool | None = None

    def __post_init__(self):
        if self.forward_batch_size is not None:
            warnings.warn("forward_batch_size is deprecated (TRL): use mini_batch_size", FutureWarning, stacklevel=3)
            self.mini_batch_size = self.forward_batch_size
        if self.log_with == "tensorboard" and "tensorboard" not in (self.report_to or []):
            self.report_to = [*(self.report_to or []), "tensorboard"]
        elif self.log_with not in (None, "", "tensorboard"):
            warnings.warn(f"log_with={self.log_with!r}: fastalign logs to metrics.jsonl (and TensorBoard), not "
                          f"{self.log_with}", stacklevel=3)
        if mixed_precision(self.accelerator_kwargs, "PPOConfig"):
            self.bf16 = True
        super().__post_init__()
        from fastalign.engine import distributed

        # TRL's derived sizes (read-only there too): samples per step and per optimizer step, all processes.
        self.world_size = distributed.world_size()
        self.global_batch_size = self.batch_size * self.world_size
        self.global_backward_batch_size = self.backward_batch_size * self.world_size
