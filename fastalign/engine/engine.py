"""The optimisation engine: device, precision, AdamW and its schedule, backward and clipped steps.

Algorithms never touch the optimizer themselves: they hand each micro-batch's loss to
``accumulate`` and call ``step`` once per optimizer step. The same calls run plain torch on one device, or DeepSpeed ZeRO
(``fastalign.engine.distributed``) when the config names a DeepSpeed config or the run has
several processes.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
from transformers import get_scheduler

from fastalign.errors import ConfigError

from . import distributed
from .config import TrainingConfig


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank())
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())


def warmup_steps(config: TrainingConfig, num_training_steps: int) -> int:
    return config.warmup_steps if config.warmup_steps > 0 else math.ceil(config.warmup_ratio * num_training_steps)


def planned_zero_stage(config: TrainingConfig) -> int | None:
    """The ZeRO stage a run with ``config`` trains under, None without DeepSpeed: DeepSpeed runs
    when the config names a DeepSpeed config or there are several processes (stage 0 unless the
    DeepSpeed config says otherwise). Known before the ``Engine`` exists, e.g. to decide what a
    trainer builds beside the trained model."""
    if config.deepspeed is None and distributed.world_size() == 1:
        return None
    return int(distributed.deepspeed_config(config)["zero_optimization"].get("stage", 0))


def check_trainable_dtype(model: torch.nn.Module) -> None:
    """float16 weights cannot be trained with AdamW: its epsilon (1e-8) rounds to 0 in float16, a
    squared gradient below about 6e-8 does too, and the first step divides by zero. Refused with
    what to do instead (bfloat16 has float32's range and trains)."""
    fp16 = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if fp16:
        raise ConfigError(
            f"{len(fp16)} trainable parameters are float16 (e.g. {fp16[0]}): AdamW cannot train float16 weights (its "
            "eps=1e-8 rounds to 0 and the first step turns them NaN); load the model with dtype float32 and set bf16 "
            "true, or dtype bfloat16, or train LoRA adapters (use_peft), which train in float32")


def enable_checkpointing(model) -> None:
    """Recompute activations in backward (transformers renamed the switch; take either name)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def adamw(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norm weights (1-d) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (every weight is frozen)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
    )


def weights_finite(params: list[torch.Tensor]) -> bool:
    """Whether every value of ``params`` is finite, in one fused norm per dtype and device."""
    if not params:
        return True
    norms = torch._foreach_norm([p.detach() for p in params], ord=float("inf"))
    return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())


def schedule_warnings(config: TrainingConfig, num_training_steps: int | None, custom: bool = False) -> list[str]:
    """What in the rate's settings is almost surely a mistake, though a run can go on with it."""
    found = []
    if not custom and config.learning_rate == 0:
        found.append("learning_rate is 0: the weights will not change")
    if num_training_steps and config.warmup_steps > num_training_steps:
        found.append(f"warmup_steps={config.warmup_steps} is longer than the run ({num_training_steps} optimizer "
                     "steps): the learning rate never reaches learning_rate")
    return found


class Engine:
    """Owns the trained model's optimizer, schedule, precision and (optionally) DeepSpeed."""

    def __init__(self, model: torch.nn.Module, config: TrainingConfig, num_training_steps: int | None = None,
                 optimizer: torch.optim.Optimizer | None = None, lr_scheduler=None):
        """``num_training_steps``: the length of the schedule (``lr_scheduler_type`` after the warmup);
        None when the run's length is not known: the rate is then constant after ``warmup_steps``,
        and without warmup there is no schedule at all (``lr_scheduler`` None: the optimizer's
        rate is left alone, e.g. to a schedule the caller steps). ``optimizer`` and
        ``lr_scheduler`` replace the default AdamW and schedule."""
        self.config = config
        distributed.init_distributed()
        self.device = default_device()
        self.world_size = distributed.world_size()
        if config.bf16 and not bf16_supported(self.device):
            raise ConfigError(f"bf16=True but {self.device} does not support bfloat16")
        check_trainable_dtype(model)
        if config.gradient_checkpointing:
            enable_checkpointing(model)
        self.model = model.to(self.device)
        self.optimizer = optimizer or adamw(model, config)
        # Every schedule warms up first ("constant" is transformers' constant_with_warmup).
        if lr_scheduler is None and num_training_steps is None:
            if config.warmup_steps > 0:
                lr_scheduler = get_scheduler("constant_with_warmup", self.optimizer, num_warmup_steps=config.warmup_steps)
        elif lr_scheduler is None:
            kind = "constant_with_warmup" if config.lr_scheduler_type == "constant" else config.lr_scheduler_type
            lr_scheduler = get_scheduler(kind, self.optimizer, num_warmup_steps=warmup_steps(config, num_training_steps),
                                         num_training_steps=num_training_steps)
        self.lr_scheduler = lr_scheduler
        if distributed.is_main():
            for line in schedule_warnings(config, num_training_steps, custom=optimizer is not None):
                print(f"fastalign: warning: {line}", file=sys.stderr)
        self.deepspeed = None
        if planned_zero_stage(config) is not None:
            self.deepspeed = distributed.initialize_training(self, config)

    @property
    def zero_stage(self) -> int | None:
        return None if self.deepspeed is None else self.deepspeed.zero_optimization_stage()

    def autocast(self):
        if not self.config.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def forward(self, fn, *args):
        """``fn(*args)``: under DeepSpeed inside its engine's forward, where ZeRO-3 gathers what it
        reads (the fused head's ``lm_head.weight``) and routes the gradients back."""
        return fn(*args) if self.deepspeed is None else self.deepspeed(fn, *args)

    def accumulate(self, loss: torch.Tensor, last: bool) -> None:
        """Add the gradient of ``loss``, already scaled to its share of the optimizer step, to the
        step's sum; ``last``: whether it is the step's last micro-batch. Never steps: ``step()`` does,
        with or without DeepSpeed."""
        if self.deepspeed is None:
            loss.backward()
            return
        # ZeRO averages gradients over processes (fastalign's loss is already the step's share, hence
        # the world size) and reduces them at the boundary, which ``last`` sets.
        self.deepspeed.set_gradient_accumulation_boundary(last)
        self.deepspeed.backward(loss * self.world_size, scale_wrt_gas=False)
        if not last:
            self.deepspeed.step()  # DeepSpeed's count of a micro-step; before the boundary nothing steps

    def step(self) -> float:
        """Clip, step the optimizer and the schedule, zero the gradients; the pre-clip grad norm.
        Call it after the step's last ``accumulate(..., last=True)``."""
        if self.deepspeed is not None:
            self.deepspeed.step()  # at the boundary: clips, steps the optimizer and the schedule
            norm = self.deepspeed.get_global_grad_norm()
            return float("nan") if norm is None else float(norm)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient norm ({norm}); the step was skipped, weights unchanged")
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not weights_finite(params):
            raise FloatingPointError(
                f"the optimizer step made weights non-finite (gradient norm {norm:.4g} was finite): stopping before "
                "they are saved (lower the learning rate, raise adam_epsilon, or train in float32 / bf16 autocast)")
        return norm

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step (of the first parameter group)."""
        if self.lr_scheduler is None:
            return self.optimizer.param_groups[0]["lr"]
        return self.lr_scheduler.get_last_lr()[0]

