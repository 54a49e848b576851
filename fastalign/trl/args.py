"""``transformers.TrainingArguments`` (and TRL's configs built on it) mapped onto fastalign's configs.

Every field is either mapped (same meaning in fastalign), accepted because it changes nothing
here (no padding, no dataloader, no DDP wrapper), ignored with a warning (logging and hub
plumbing fastalign does its own way), or refused with a ``ConfigError`` naming the field when it
would change the results and fastalign cannot do it. A field left at transformers' default is
never reported.

Batch sizes given as counts (``per_device_train_batch_size``, ``per_device_eval_batch_size``)
are rows (pairs for preference data) per micro-batch; fastalign packs rows without padding into
a token budget, so each count becomes ``count x the longest row`` tokens when the data is planned
(``RowBudget``): every micro-batch holds at least ``count`` rows, more when they are shorter.
``max_tokens_per_batch`` (a trainer keyword) gives the token budget directly and wins.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field

import transformers
from transformers import TrainingArguments

from fastalign.errors import ConfigError

# TRL-era TrainingArguments names that transformers has since renamed or removed.
LEGACY_NAMES = {"evaluation_strategy": "eval_strategy", "warmup_ratio": None, "overwrite_output_dir": None,
                "logging_dir": None, "no_cuda": "use_cpu", "group_by_length": None}

# Fields mapped onto fastalign's config, or read by the layer itself.
MAPPED = {
    "output_dir", "seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "lr_scheduler_type", "warmup_steps", "warmup_ratio", "max_grad_norm", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "bf16", "fp16",
    "gradient_checkpointing", "activation_checkpointing", "eval_strategy", "evaluation_strategy", "eval_steps",
    "save_strategy", "save_steps", "save_total_limit", "logging_strategy", "logging_steps", "report_to",
    "disable_tqdm", "deepspeed", "resume_from_checkpoint", "optim", "optim_args", "push_to_hub", "hub_model_id",
    "hub_token", "hub_private_repo", "hub_strategy", "hub_revision", "neftune_noise_alpha", "overwrite_output_dir",
    "max_length", "logging_first_step",
}
# Accepted: they change nothing in a packed, padding-free run (or only how fast it goes).
HARMLESS = {
    "remove_unused_columns", "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs", "group_by_length",
    "length_column_name", "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "dataloader_in_order", "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
    "ddp_static_graph", "ddp_backend", "ddp_timeout", "local_rank", "log_level", "log_level_replica",
    "log_on_each_node", "logging_nan_inf_filter", "logging_dir", "run_name", "project", "tf32", "torch_compile",
    "torch_compile_backend", "torch_compile_mode", "use_liger_kernel", "liger_kernel_config", "use_cache",
    "torch_empty_cache_steps", "include_num_input_tokens_seen", "skip_memory_metrics", "debug", "do_train",
    "do_eval", "do_predict", "label_names", "prediction_loss_only", "eval_accumulation_steps", "eval_delay",
    "eval_do_concat_batches", "eval_use_gather_object", "include_for_metrics", "batch_eval_metrics",
    "bf16_full_eval", "fp16_full_eval", "average_tokens_across_devices", "save_on_each_node", "save_only_model",
    "save_safetensors", "ignore_data_skip", "data_seed", "full_determinism", "accelerator_config",
    "parallelism_config", "restore_callback_states_from_checkpoint", "enable_jit_checkpoint", "train_sampling_strategy",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "hub_always_push", "use_cpu", "no_cuda",
    "eval_on_start", "greater_is_better", "metric_for_best_model",
}
# Refused when set: they would change the results and fastalign does not do them.
REFUSED = {
    "label_smoothing_factor": "label smoothing of the SFT loss is not implemented",
    "load_best_model_at_end": "the final model is the last step's; evaluate checkpoints yourself",
    "fsdp": "use deepspeed (ZeRO stages 0-3) instead of FSDP",
    "fsdp_config": "use deepspeed (ZeRO stages 0-3) instead of FSDP",
    "lr_scheduler_kwargs": "the schedules take no extra arguments here",
    "optim_target_modules": "GaLore-style optimizers are not supported",
    "auto_find_batch_size": "give a batch size (or max_tokens_per_batch); batches are packed",
}
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


@dataclass
class RowBudget:
    """Rows per micro-batch (TRL's counts) to turn into token budgets once the data's lengths are
    known; None: the config's ``max_tokens_per_batch`` stands."""

    train: int | None = None
    eval: int | None = None


@dataclass
class Mapped:
    """What a ``TrainingArguments`` says, in fastalign's terms."""

    fields: dict  # keyword arguments of the native config
    rows: RowBudget = field(default_factory=RowBudget)
    eval_per_epoch: bool = False
    save_per_epoch: bool = False
    optimizer: str | None = None  # an optimizer other than AdamW (transformers' name)
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    logging_first_step: bool = False


def accept_legacy_names() -> None:
    """Let ``transformers.TrainingArguments`` take the TRL-era names later transformers removed
    (``evaluation_strategy`` -> ``eval_strategy``, ``no_cuda`` -> ``use_cpu``; ``warmup_ratio``,
    ``overwrite_output_dir``, ``logging_dir`` and ``group_by_length`` kept as attributes), so TRL
    0.7.10 scripts that build one run unchanged. Done once, when ``fastalign.trl`` is imported."""
    cls = TrainingArguments
    names = {f.name for f in dataclasses.fields(cls)}
    legacy = {old: new for old, new in LEGACY_NAMES.items() if old not in names}
    if not legacy or getattr(cls.__init__, "_fastalign_legacy", False):
        return
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        kept = {}
        for old, new in legacy.items():
            if old in kwargs:
                value = kwargs.pop(old)
                if new is not None and new not in kwargs:
                    kwargs[new] = value
                else:
                    kept[old] = value
        if "warmup_ratio" in kept and kept["warmup_ratio"] and not kwargs.get("warmup_steps"):
            kwargs["warmup_steps"] = kept["warmup_ratio"]  # transformers >= 5: a float < 1 is a ratio
        init(self, *args, **kwargs)
        for old, value in kept.items():
            object.__setattr__(self, old, value)

    __init__._fastalign_legacy = True
    cls.__init__ = __init__


def default_arguments(output_dir: str = "tmp_trainer") -> TrainingArguments:
    """What TRL's trainers use when no ``args`` are given: transformers' defaults (3 epochs, learning
    rate 5e-5, linear decay, 8 rows per micro-batch)."""
    return TrainingArguments(output_dir=output_dir, report_to="none")


@functools.lru_cache(maxsize=8)
def _defaults(cls: type) -> dict:
    return _values(cls(output_dir="tmp_trainer"))


def _values(args) -> dict:
    out = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(args)}
    for old in LEGACY_NAMES:
        if hasattr(args, old) and old not in out:
            out[old] = getattr(args, old)
    return out


def _plain(value):
    return getattr(value, "value", value)  # transformers' string enums


def changed_fields(args) -> dict:
    """The fields of ``args`` that differ from transformers' defaults for its class."""
    defaults = _defaults(type(args))
    return {k: _plain(v) for k, v in _values(args).items() if k not in defaults or _plain(v) != _plain(defaults[k])}


def map_training_arguments(args, config_fields: set[str]) -> Mapped:
    """``args`` (a ``TrainingArguments``) as a native config's keyword arguments (only the names in
    ``config_fields``), warning about what is ignored and refusing what fastalign cannot do."""
    changed = changed_fields(args)
    for name, value in changed.items():
        if name in REFUSED and value not in (None, False, "", [], {}, 0, 0.0):
            raise ConfigError(f"{name}={value!r} is not supported by fastalign.trl: {REFUSED[name]}")
    ignored = sorted(k for k in changed if k not in MAPPED | HARMLESS | set(REFUSED) and k not in config_fields)
    if ignored:
        warnings.warn(f"fastalign.trl ignores these TrainingArguments: {', '.join(ignored)}", stacklevel=3)
    out = Mapped({})
    f = out.fields
    for name in ("output_dir", "seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "max_grad_norm", "max_steps", "gradient_accumulation_steps", "disable_tqdm", "deepspeed",
                 "save_total_limit"):
        f[name] = getattr(args, name)
    f["num_train_epochs"] = _whole_epochs(args.num_train_epochs)
    f.update(_schedule(args))
    f["bf16"] = bool(args.bf16)
    if getattr(args, "fp16", False):
        warnings.warn("fp16=True runs as bfloat16 autocast in fastalign (same speed, float32's range, no loss "
                      "scaling); the numbers differ slightly from fp16 mixed precision", stacklevel=3)
        f["bf16"] = True
    f["gradient_checkpointing"] = bool(getattr(args, "gradient_checkpointing", False)
                                       or getattr(args, "activation_checkpointing", False))
    f["logging_steps"] = _interval("logging_steps", args.logging_steps)
    f["report_to"] = _report_to(args.report_to)
    f.update(_eval_and_save(args, out))
    if getattr(args, "overwrite_output_dir", False):
        f["overwrite_output_dir"] = True
    if getattr(args, "neftune_noise_alpha", None):
        f["neftune_noise_alpha"] = args.neftune_noise_alpha
    if getattr(args, "max_length", None) is not None:
        f["max_length"] = args.max_length
    optim = str(_plain(args.optim))
    out.optimizer = None if optim.startswith("adamw_torch") or optim in ("adamw_hf", "adamw_apex_fused") else optim
    out.rows = RowBudget(args.per_device_train_batch_size, args.per_device_eval_batch_size)
    out.push_to_hub, out.hub_model_id = bool(args.push_to_hub), args.hub_model_id
    out.hub_token = getattr(args, "hub_token", None)
    out.logging_first_step = bool(getattr(args, "logging_first_step", False))
    out.fields = {k: v for k, v in f.items() if k in config_fields}
    return out


def _whole_epochs(epochs: float) -> int:
    if epochs != int(epochs):
        raise ConfigError(f"num_train_epochs={epochs}: fastalign runs whole epochs; set max_steps for part of one")
    return int(epochs)


def _interval(name: str, value) -> int:
    if value < 1:
        raise ConfigError(f"{name}={value}: give a number of steps (fractions of the run are not supported)")
    return int(value)


def _schedule(args) -> dict:
    kind = str(_plain(args.lr_scheduler_type))
    if kind not in SCHEDULES:
        raise ConfigError(f"lr_scheduler_type={kind!r} is not supported by fastalign.trl: use one of "
                          f"{', '.join(SCHEDULES)}")
    warmup = args.warmup_steps
    ratio = getattr(args, "warmup_ratio", 0.0) or 0.0
    if isinstance(warmup, float) and 0 < warmup < 1:
        warmup, ratio = 0, warmup
    if kind == "constant":  # transformers' "constant" has no warmup at all
        warmup, ratio = 0, 0.0
    return {"lr_scheduler_type": SCHEDULES[kind], "warmup_steps": int(warmup), "warmup_ratio": float(ratio)}


def _report_to(report_to) -> list[str]:
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "all" in names:
        import importlib.util

        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    others = sorted(set(names) - {"tensorboard", "none"})
    if others:
        warnings.warn(f"report_to={others}: fastalign logs to metrics.jsonl (and TensorBoard); not to {others}",
                      stacklevel=4)
    return ["tensorboard"] if "tensorboard" in names else []


def _eval_and_save(args, out: Mapped) -> dict:
    f = {}
    strategy = str(_plain(getattr(args, "evaluation_strategy", None) or getattr(args, "eval_strategy", "no")))
    if strategy == "steps":
        f["eval_steps"] = _interval("eval_steps", args.eval_steps or args.logging_steps)
    out.eval_per_epoch = strategy == "epoch"
    save = str(_plain(args.save_strategy))
    if save == "steps":
        f["save_steps"] = _interval("save_steps", args.save_steps)
    elif save == "best":
        raise ConfigError("save_strategy='best' is not supported by fastalign.trl: use 'steps' or 'epoch'")
    out.save_per_epoch = save == "epoch"
    return f


def optimizer_for(name: str, args, model) -> object:
    """Transformers' optimizer ``name`` (``optim``) over ``model``'s trainable parameters, weight
    decay on the matrices only (as transformers and fastalign's AdamW do)."""
    try:
        cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"optim={name!r}: {err}") from err
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return cls([g for g in groups if g["params"]], **kwargs)


def rows_to_tokens(rows: int, longest: int) -> int:
    """The token budget of a micro-batch of ``rows`` rows of at most ``longest`` tokens."""
    return max(2, rows * max(1, int(longest)))
