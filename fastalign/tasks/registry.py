"""Named functions, one registry: what a config's ``reward_function`` or ``prompt_function`` names.

A name is a built-in below or ``package.module:function``, imported as Python imports it, the
working directory first (as ``python -m`` does: ``myreward.py`` there is ``myreward:score``). PPO's rewards score texts
(``(queries, responses) -> one float each``); DDPO's score images (``(images, prompts, metadata)
-> (rewards, metadata)``); DDPO's prompt functions return ``(prompt, metadata)``.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys

from fastalign.errors import ConfigError

from .compressibility import animal_prompt, jpeg_compressibility, jpeg_incompressibility
from .sort_digits import sortedness_reward


def sort_digits_reward(queries, responses) -> list[float]:
    """PPO's reward on the built-in task: the graded sortedness of each response to its query."""
    return [sortedness_reward(q, r) for q, r in zip(queries, responses)]


TEXT_REWARDS = {"sort_digits": sort_digits_reward}
IMAGE_REWARDS = {"jpeg_compressibility": jpeg_compressibility, "jpeg_incompressibility": jpeg_incompressibility}
PROMPTS = {"animals": animal_prompt}


def named_function(spec: str, builtins: dict, kind: str = "reward_function"):
    """A function by name: one of ``builtins`` or ``package.module:function``."""
    if spec in builtins:
        return builtins[spec]
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"{kind} {spec!r}: expected one of {sorted(builtins)} or 'package.module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the fastalign script's own path lacks it
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ImportError as err:
        raise ConfigError(f"{kind} {spec!r}: cannot import {module} ({err})") from None
    except Exception as err:  # the module itself fails: a syntax error, an exception at its top level
        raise ConfigError(f"{kind} {spec!r}: importing {module} failed: {type(err).__name__}: "
                          f"{' '.join(str(err).split())}") from None
    if not callable(fn):
        raise ConfigError(f"{kind} {spec!r}: {module} has no function {name!r}")
    return fn


def text_reward(spec: str):
    """PPO's reward function by name (``sort_digits``) or ``package.module:function``, its scores
    checked when it runs: one finite number per response (a ``ConfigError`` naming the function),
    and an exception in it named with the function."""
    fn = named_function(spec, TEXT_REWARDS)

    def checked(queries, responses):
        try:
            scores = fn(queries, responses)
        except Exception as err:
            raise RuntimeError(f"reward_function {spec!r} failed: {type(err).__name__}: {err}") from err
        values = scores.tolist() if hasattr(scores, "tolist") else scores
        if not isinstance(values, (list, tuple)) or len(values) != len(responses):
            got = f"{len(values)} scores" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise ConfigError(f"reward_function {spec!r} returned {got} for {len(responses)} responses (one number each)")
        for i, value in enumerate(values):
            value = value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(f"reward_function {spec!r} returned {value!r} for response {i}: every score must be "
                                  "a finite number")
        return scores

    return checked


def image_reward(spec: str):
    """DDPO's reward function by name (``jpeg_compressibility``, ``jpeg_incompressibility``) or
    ``package.module:function``."""
    return named_function(spec, IMAGE_REWARDS)


def prompt_function(spec: str):
    """DDPO's prompt function by name (``animals``: simple animal names) or ``package.module:function``."""
    return named_function(spec, PROMPTS, "prompt_function")
