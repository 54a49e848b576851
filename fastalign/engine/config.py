"""The options every fastalign trainer shares (field names as in Hugging Face's TrainingArguments).

Batches are packed, so their size is a token budget (``max_tokens_per_batch`` per micro-batch and
device), not a count of rows. One optimizer step sums ``gradient_accumulation_steps`` micro-batches
on every device and normalises the loss by the step's total weight (loss tokens for SFT, pairs for
preference losses), so the step is the same whatever the split over devices and micro-batches.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from fastalign.errors import ConfigError
from fastalign.options import check_fields, option

SCHEDULES = ("linear", "cosine", "constant")
DEEPSPEED_SHORT_KEYS = ("stage", "offload_optimizer", "offload_param")


def deepspeed_settings(given) -> dict:
    """What the ``deepspeed`` option names, read and checked: a full DeepSpeed config (a mapping with
    ``zero_optimization``, or a JSON file of one) as it is, else the short keys (``stage`` 0-3,
    ``offload_optimizer``, ``offload_param``, which needs stage 3). A file that is missing is a
    ``FileNotFoundError``; one that is not JSON, or a key or stage that is not known, a ``ConfigError``."""
    if isinstance(given, (str, Path)):
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"deepspeed config {path} not found")
        try:
            given = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"deepspeed config {path}: not valid JSON ({' '.join(str(err).split())})") from None
        if not isinstance(given, dict):
            raise ConfigError(f"deepspeed config {path} must hold a JSON object, got {type(given).__name__}")
    given = dict(given or {"stage": 0})
    if "zero_optimization" in given:
        return given
    unknown = set(given) - set(DEEPSPEED_SHORT_KEYS)
    if unknown:
        raise ConfigError(f"deepspeed: unknown short keys {sorted(unknown)}; use stage, offload_optimizer, "
                          "offload_param, or a full DeepSpeed config with zero_optimization")
    stage = given.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if given.get("offload_param") and stage != 3:
        raise ConfigError("deepspeed: offload_param needs ZeRO stage 3")
    return given


@dataclass
class TrainingConfig:
    output_dir: str = option("runs/fastalign", "where checkpoints, metrics.jsonl, plots and the final model go")
    seed: int = option(42, "seeds weights, shuffling, dropout and sampling", ge=0, le=2**32 - 1)
    # Optimisation: AdamW, a warmup then a linear/cosine decay (or constant), clipping.
    learning_rate: float = option(5e-5, "the peak learning rate, reached after the warmup", ge=0)
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay", ge=0)
    adam_beta1: float = option(0.9, "AdamW's first-moment decay", ge=0, lt=1)
    adam_beta2: float = option(0.999, "AdamW's second-moment decay", ge=0, lt=1)
    adam_epsilon: float = option(1e-8, "AdamW's epsilon", ge=0)
    lr_scheduler_type: str = option("linear", "the learning rate after the warmup", choices=SCHEDULES)
    warmup_steps: int = option(0, "optimizer steps of linear warmup (wins over warmup_ratio)", ge=0)
    warmup_ratio: float = option(0.0, "the warmup as a fraction of the run's steps", ge=0, le=1)
    max_grad_norm: float | None = option(1.0, "clip the gradient to this norm (0 or null: no clipping)", ge=0)
    # Length of the run: max_steps > 0 wins over num_train_epochs.
    num_train_epochs: int = option(1, "passes over the training set", ge=0)
    max_steps: int = option(-1, "optimizer steps of the run; -1 or 0: num_train_epochs decides", ge=-1)
    # Batching: packed micro-batches of at most this many tokens, per device.
    max_tokens_per_batch: int = option(4096, "tokens per packed micro-batch and device (the batch size)", ge=2)
    gradient_accumulation_steps: int = option(1, "micro-batches summed per optimizer step", ge=1)
    shuffle: bool = option(True, "shuffle the packed micro-batches every epoch")
    # Data: tokenizing processes (None: every core for a large data set, one for a small one).
    dataset_num_proc: int | None = option(None, "tokenizing processes (null: every core, at most 8, from 20,000 "
                                          "rows; one below)", ge=1)
    # A data set larger than memory: read it as a stream (a path or hub name given as the data set,
    # or a datasets.IterableDataset), tokenized and packed stream_window_rows rows at a time.
    streaming: bool = option(False, "read the training set as a stream (needs max_steps)")
    stream_window_rows: int = option(1024, "rows tokenized and packed at a time when streaming", ge=1)
    # Precision and memory.
    bf16: bool = option(False, "bfloat16 autocast of the compute (weights stay in their dtype)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    # Evaluation, checkpoints, logging (intervals in optimizer steps; None: never).
    eval_steps: int | None = option(None, "evaluate every this many steps (null: only at the end)", ge=1)
    save_steps: int | None = option(None, "save a checkpoint every this many steps (null: never)", ge=1)
    save_total_limit: int | None = option(2, "checkpoints kept, the oldest removed first (null: all)", ge=1)
    resume_from_checkpoint: str | bool | None = option(None, "a checkpoint folder to resume from, or true for the "
                                                       "latest in output_dir")
    # A new run refuses an output_dir holding another run's checkpoints, model or metrics; True
    # deletes the old checkpoints first and starts anew there.
    overwrite_output_dir: bool = option(False, "start anew in an output_dir that holds another run (its "
                                        "checkpoints deleted first); false: such a folder is refused")
    logging_steps: int = option(1, "log metrics every this many steps", ge=1)
    report_to: list[str] = option([], "also report to: [tensorboard] or none")
    disable_tqdm: bool = option(False, "no progress bar")
    # DeepSpeed: a JSON file, a dict of DeepSpeed config, or None for plain torch.
    deepspeed: str | dict | None = option(None, "DeepSpeed: a JSON file, a mapping ({stage: 3, offload_optimizer: "
                                          "true}) or null for plain torch")

    def __post_init__(self):
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("none", "") else [self.report_to]
        check_fields(self)
        unknown = set(self.report_to) - {"tensorboard"}
        if unknown:
            raise ConfigError(f"report_to: unknown {sorted(unknown)}; fastalign reports to 'tensorboard' or 'none'")
        if self.num_train_epochs < 1 and self.max_steps <= 0:
            raise ConfigError(f"num_train_epochs must be >= 1 when max_steps is not set, got {self.num_train_epochs}")
        if self.deepspeed is not None:
            deepspeed_settings(self.deepspeed)  # a bad file or key is named now, not once the model is loaded

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
