"""The reward functions of a GRPO or RLOO run: texts scored by functions, sequences by reward models.

``reward_funcs`` is one or a list of:

- a callable. Written TRL's way, ``f(prompts, completions, completion_ids, **kwargs)`` (keywords;
  ``kwargs`` gets the prompt rows' other columns), or plainly ``f(prompts, completions)`` (two
  positional lists of texts, as PPO's ``reward_fn``). One float per completion; ``None`` marks a
  completion it cannot score (NaN: left out of the statistics, advantage 0 when no function scores it);
- a name: a built-in of ``fastalign.tasks.registry`` (``sort_digits``) or ``package.module:function``;
- a reward model (a ``RewardTrainer``'s output, any one-label sequence classifier), or its name or
  path: it scores prompt+completion from packed rows and must share the policy's tokenizer.

Names (``rewards/<name>/mean``): a function's ``__name__``, a registry name as given, a model's
config name (its last path part).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastalign.errors import ConfigError
from fastalign.tasks.registry import TEXT_REWARDS, named_function


def _is_function_name(spec: str) -> bool:
    return spec in TEXT_REWARDS or (":" in spec and not spec.startswith(("/", ".")))


def _callable_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _model_name(model) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return str(name).rstrip("/").split("/")[-1]


def _call(fn: Callable, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
          columns: dict[str, list]) -> list:
    """``fn`` called TRL's way (keywords) when it names ``completions`` or takes ``**kwargs``, else
    with the two lists of texts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    given = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**given)
    if "completions" in params:
        return fn(**{k: v for k, v in given.items() if k in params})
    return fn(prompts, completions)


@dataclass
class RewardFunctions:
    """``funcs`` (callables, or reward models: ``torch.nn.Module``), their ``names`` and ``weights``."""

    funcs: list
    names: list[str]
    weights: torch.Tensor

    @classmethod
    def of(cls, reward_funcs, weights: list[float] | None, load_model: Callable) -> RewardFunctions:
        """From what a trainer is given; ``load_model(model)`` loads a reward model by name or path,
        or sets one given as an object up to run packed rows (its attention backend)."""
        given = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not given or any(f is None for f in given):
            raise ValueError("give reward_funcs: one or more reward functions or reward models")
        funcs, names = [], []
        for f in given:
            if isinstance(f, str) and _is_function_name(f):
                funcs.append(named_function(f, TEXT_REWARDS))
                names.append(f.rpartition(":")[2])
            elif isinstance(f, (str, torch.nn.Module)):  # a reward model, set up to run packed
                funcs.append(load_model(f))
                names.append(_model_name(funcs[-1]))
            elif callable(f):
                funcs.append(f)
                names.append(_callable_name(f))
            else:
                raise TypeError(f"a reward function must be a callable, a name or a reward model, got {type(f).__name__}")
        if weights is not None and len(weights) != len(funcs):
            raise ConfigError(f"reward_weights has {len(weights)} weights for {len(funcs)} reward functions")
        w = torch.ones(len(funcs)) if weights is None else torch.tensor(weights, dtype=torch.float32)
        return cls(funcs, names, w)

    @property
    def models(self) -> list[int]:
        """Indices of the reward models."""
        return [i for i, f in enumerate(self.funcs) if isinstance(f, torch.nn.Module)]

    def score(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]], columns: dict,
              model_scores: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor:
        """fp32 ``[n, F]``: each function's reward of each completion (NaN: not scored);
        ``model_scores(model)`` scores the completions with a reward model."""
        out = torch.full((len(completions), len(self.funcs)), float("nan"))
        for i, (fn, name) in enumerate(zip(self.funcs, self.names)):
            if isinstance(fn, torch.nn.Module):
                out[:, i] = model_scores(fn).float().cpu()
                continue
            values = list(_call(fn, prompts, completions, completion_ids, columns))
            if len(values) != len(completions):
                raise ConfigError(f"reward function {name!r} returned {len(values)} rewards for {len(completions)} "
                                 "completions: one per completion")
            out[:, i] = torch.tensor([float("nan") if v is None else float(v) for v in values])
        return out

    def combined(self, per_func: torch.Tensor) -> torch.Tensor:
        """The weighted sum over functions ``[n]``; NaN where no function scored."""
        total = (per_func * self.weights.to(per_func)).nansum(dim=1)
        return total.masked_fill(torch.isnan(per_func).all(dim=1), float("nan"))
