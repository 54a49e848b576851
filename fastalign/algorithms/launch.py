"""Building a trainer from a run config: the run keys each trainer declares (which model, which
data, adapters, rewards: what is not an option of the algorithm's config), and the loaders the
trainers share to turn them into a model, a tokenizer and data sets.

A trainer class declares ``run_keys`` (a tuple of ``RunKey``) and ``launch(config, run) -> dict``,
which builds the trainer from its config and the run keys' values, trains, and returns the
result. The ``fastalign`` command reads only these declarations.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastalign.engine import distributed
from fastalign.errors import ConfigError
from fastalign.options import BOUNDS, describe

if TYPE_CHECKING:
    import peft
    import torch

    from fastalign.engine import TrainingConfig


@dataclass(frozen=True)
class RunKey:
    """One run key: its ``name``, the ``kind`` of value (``str``, ``bool``, ``int``, ``float``,
    ``list`` or ``dict``), a one-line ``help``, its ``default``, whether a run must give it and the
    ``choices`` it takes, if only some."""

    name: str
    kind: type
    help: str
    default: object = None
    required: bool = False
    choices: tuple = ()
    bounds: tuple = ()  # (("ge", 1), ("lt", 1)): bounds on a number, as ``fastalign.options.option`` takes

    @property
    def constraint(self) -> str:
        """The bounds in words: ``">= 0 and < 1"``, or ``""``."""
        return " and ".join(f"{BOUNDS[b][1]} {v}" for b, v in self.bounds)

    def check(self, value):
        """``value`` as this key takes it (an int for a float, a text alone for a list), or a
        ``ConfigError`` naming the key; None is no value."""
        if value is None:
            return None
        if self.kind is list and isinstance(value, str):
            value = [value]
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self.name} must be {describe(self.kind)}, got {value!r}")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{self.name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        if self.bounds and not (math.isfinite(value) and all(BOUNDS[b][0](value, v) for b, v in self.bounds)):
            raise ConfigError(f"{self.name} must be {describe(self.kind)} {self.constraint}, got {value!r}")
        return value


MODEL_KEYS = (
    RunKey("model_name_or_path", str, "a hub name, a local path, or a built-in (fastalign/tiny-llama, "
           "fastalign/tiny-qwen2)", required=True),
    RunKey("tokenizer_name_or_path", str, "the tokenizer; defaults to the model's"),
    RunKey("dtype", str, "the weights' dtype (auto: the checkpoint's)", choices=("float32", "bfloat16", "float16", "auto")),
    RunKey("trust_remote_code", bool, "run code shipped with the model", default=False),
)
DATA_KEYS = (
    RunKey("dataset_name", str, "a hub name, a data file (.json/.jsonl/.parquet/.csv, .gz ok) or a folder",
           required=True),
    RunKey("dataset_config", str, "the dataset's configuration name, if any"),
    RunKey("dataset_train_split", str, "the split trained on", default="train"),
)
EVAL_KEYS = (RunKey("dataset_test_split", str, "a split evaluated at eval_steps and at the end"),)
PEFT_KEYS = (
    RunKey("use_peft", bool, "train LoRA adapters instead of the whole model", default=False),
    RunKey("lora_r", int, "LoRA rank", default=16, bounds=(("ge", 1),)),
    RunKey("lora_alpha", int, "LoRA alpha", default=32, bounds=(("ge", 1),)),
    RunKey("lora_dropout", float, "LoRA dropout", default=0.05, bounds=(("ge", 0), ("lt", 1))),
    RunKey("lora_target_modules", list, "module names to adapt (default: the model type's usual ones)"),
)
REF_MODEL_KEY = RunKey("ref_model_name_or_path", str, "a separate reference model (default: a frozen copy, or the "
                       "model with its adapters disabled under use_peft)")
# What a trainer built from a model and a data set of rows takes (SFT, reward, DPO).
PACKED_KEYS = MODEL_KEYS + DATA_KEYS + EVAL_KEYS + PEFT_KEYS


def defaults(keys: tuple[RunKey, ...], run: dict) -> dict:
    """``run`` checked and with the defaults of ``keys`` it does not set; a required key missing is
    an error."""
    missing = [k.name for k in keys if k.required and run.get(k.name) in (None, "")]
    if missing:
        raise ConfigError(f"the config needs {' and '.join(missing)}")
    given = {k.name: k.check(run[k.name]) for k in keys if k.name in run}
    return {**{k.name: k.default for k in keys}, **run, **given}


def peft_config(run: dict, task_type: str = "CAUSAL_LM") -> peft.LoraConfig | None:
    """The LoRA config the run keys describe, or None without ``use_peft``."""
    if not run.get("use_peft"):
        return None
    from peft import LoraConfig

    return LoraConfig(r=run["lora_r"], lora_alpha=run["lora_alpha"], lora_dropout=run["lora_dropout"],
                      target_modules=run["lora_target_modules"], task_type=task_type)


def model_options(run: dict) -> dict:
    return {"dtype": run.get("dtype"), "trust_remote_code": bool(run.get("trust_remote_code"))}


def load_policy(trainer_class: type, run: dict) -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` named by the run, loaded as ``trainer_class`` loads its models."""
    from fastalign.models import load_tokenizer

    name = run["model_name_or_path"]
    tokenizer = load_tokenizer(run.get("tokenizer_name_or_path") or name)
    model, report = trainer_class.model_loader(name, **model_options(run))
    if distributed.is_main():
        print(f"fastalign: {name}: attention {report}", file=sys.stderr)
    return model, tokenizer


def load_reference(run: dict, policy, tokenizer) -> dict:
    """``{"ref_model": model}`` when the run names a separate reference model (one that reads the
    policy's tokens), else ``{}``."""
    from fastalign.models import load_model
    from fastalign.models.loading import check_shared_tokens

    name = run.get("ref_model_name_or_path")
    if not name:
        return {}
    reference = load_model(name, **model_options(run))[0]
    check_shared_tokens(policy, tokenizer, reference, name, "ref_model_name_or_path")
    return {"ref_model": reference}


def load_splits(run: dict, streaming: bool = False) -> tuple[object, object | None]:
    """``(train rows, eval rows or None)`` from the run's data set and splits."""
    from fastalign.data import load_rows

    source, name = run["dataset_name"], run.get("dataset_config")
    train = load_rows(source, run.get("dataset_train_split") or "train", name, streaming=streaming)
    test = run.get("dataset_test_split")
    return train, (load_rows(source, test, name) if test else None)


def launch_packed(trainer_class: type, config: TrainingConfig, run: dict) -> dict:
    """Build a trainer of rows (SFT, reward, DPO) from its config and run keys, and train it."""
    run = defaults(trainer_class.run_keys, run)
    if config.eval_steps is not None and not run.get("dataset_test_split"):
        raise ConfigError(f"eval_steps={config.eval_steps} evaluates the dataset_test_split, and there is none: name "
                          "the split to evaluate, or leave eval_steps out")
    model, tokenizer = load_policy(trainer_class, run)
    train, evals = load_splits(run, streaming=bool(getattr(config, "streaming", False)))
    extra = load_reference(run, model, tokenizer) if REF_MODEL_KEY in trainer_class.run_keys else {}
    trainer = trainer_class(model, args=config, train_dataset=train, eval_dataset=evals, tokenizer=tokenizer,
                            peft_config=peft_config(run, trainer_class.peft_task_type), **extra)
    for split, report in trainer.reports.items():
        if distributed.is_main():
            print(f"fastalign: {split} data: {report}", file=sys.stderr)
    return trainer.train()
