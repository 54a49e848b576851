"""``trl.DDPOConfig`` (0.7.10): fastalign's ``DDPOConfig`` (the same options and defaults) plus TRL's
tracker fields. ``log_with="tensorboard"`` reports to TensorBoard (``metrics.jsonl`` always; wandb
is not supported: a warning). ``project_kwargs``' ``project_dir`` is the output folder and its
``total_limit`` the number of checkpoints kept; ``accelerator_kwargs`` may set ``mixed_precision``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from fastalign.algorithms.ddpo import DDPOConfig as NativeDDPOConfig

from .ppo_config import _exp_name

NATIVE_OUTPUT = NativeDDPOConfig.output_dir


@dataclass
class DDPOConfig(NativeDDPOConfig):
    exp_name: str = field(default_factory=_exp_name)
    run_name: str | None = ""
    log_with: str | None = None
    tracker_kwargs: dict = field(default_factory=dict)
    accelerator_kwargs: dict = field(default_factory=dict)
    project_kwargs: dict = field(default_factory=dict)
    tracker_project_name: str = "trl"
    logdir: str = "logs"

    def __post_init__(self):
        project = dict(self.project_kwargs or {})
        if project.get("project_dir") and self.output_dir == NATIVE_OUTPUT:
            self.output_dir = project["project_dir"]
        if project.get("total_limit"):
            self.num_checkpoint_limit = project["total_limit"]
        if self.log_with == "tensorboard":
            self.report_to = ("tensorboard",)
        elif self.log_with not in (None, ""):
            warnings.warn(f"log_with={self.log_with!r}: fastalign logs to metrics.jsonl (and TensorBoard) and writes "
                          f"the hook's images to OUTPUT_DIR/images, not to {self.log_with}", stacklevel=3)
        precision = (self.accelerator_kwargs or {}).get("mixed_precision")
        if precision:
            self.mixed_precision = precision
        super().__post_init__()
