"""The options every fastalign trainer shares (field names as in Hugging Face's TrainingArguments).

Batches are packed, so their size is a token budget (``max_tokens_per_batch`` per micro-batch and
device), not a count of rows. One optimizer step sums ``gradient_accumulation_steps`` micro-batches
on every device and normalises the loss by the step's total weight (loss tokens for SFT, pairs for
preference losses), so the step is the same whatever the split over devices and micro-batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainingConfig:
    output_dir: str = "runs/fastalign"
    seed: int = 42
    # Optimisation: AdamW, a warmup then a linear/cosine decay (or constant), clipping.
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    # Length of the run: max_steps > 0 wins over num_train_epochs.
    num_train_epochs: int = 1
    max_steps: int = -1
    # Batching: packed micro-batches of at most this many tokens, per device.
    max_tokens_per_batch: int = 4096
    gradient_accumulation_steps: int = 1
    shuffle: bool = True
    # Data: tokenizing processes (None: every core for a large data set, one for a small one).
    dataset_num_proc: int | None = None
    # A data set larger than memory: read it as a stream (a path or hub name given as the data set,
    # or a datasets.IterableDataset), tokenized and packed stream_window_rows rows at a time.
    streaming: bool = False
    stream_window_rows: int = 1024
    # Precision and memory.
    bf16: bool = False
    gradient_checkpointing: bool = False
    # Evaluation, checkpoints, logging (intervals in optimizer steps; None: never, 0 also never).
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | bool | None = None  # a checkpoint dir, or True for the latest in output_dir
    # A new run refuses an output_dir holding another run's checkpoints, model or metrics; True
    # deletes the old checkpoints first and starts anew there.
    overwrite_output_dir: bool = False
    logging_steps: int = 1
    report_to: list[str] = field(default_factory=list)  # [] or ["tensorboard"]
    disable_tqdm: bool = False
    # DeepSpeed: a JSON file, a dict of DeepSpeed config, or None for plain torch.
    deepspeed: str | dict | None = None

    def __post_init__(self):
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("none", "") else [self.report_to]
        unknown = set(self.report_to) - {"tensorboard"}
        if unknown:
            raise ValueError(f"report_to: unknown {sorted(unknown)}; fastalign reports to 'tensorboard' or 'none'")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        checks = {
            "learning_rate": self.learning_rate >= 0,
            "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
            "max_tokens_per_batch": self.max_tokens_per_batch >= 2,
            "num_train_epochs": self.num_train_epochs >= 1 or self.max_steps > 0,
            "warmup_ratio": 0.0 <= self.warmup_ratio <= 1.0,
            "logging_steps": self.logging_steps >= 1,
            "dataset_num_proc": self.dataset_num_proc is None or self.dataset_num_proc >= 1,
            "stream_window_rows": self.stream_window_rows >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
