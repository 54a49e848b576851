"""Reward functions by name: the built-ins (``sort_digits``) or any ``package.module:function``."""

from __future__ import annotations

def _sort_digits_reward(queries, responses):
    from fastalign.tasks.sort_digits import sortedness_reward

    return [sortedness_reward(q, r) for q, r in zip(queries, responses)]


BUILTIN_REWARDS = {"sort_digits": _sort_digits_reward}


def named_function(spec: str, builtins: dict, kind: str = "reward_function"):
    """A function by name: one of ``builtins`` or ``package.module:function``."""
    if spec in builtins:
        return builtins[spec]
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{kind} {spec!r}: expected one of {sorted(builtins)} or 'package.module:function'")
    import importlib

    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"{kind} {spec!r}: {module} has no function {name!r}")
    return fn


def reward_function(spec: str):
    """A reward function by name: a built-in (``sort_digits``) or ``package.module:function``."""
    return named_function(spec, BUILTIN_REWARDS)
