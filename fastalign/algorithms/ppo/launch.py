"""A PPO run built from the command's run keys: the policy and its prompts, rewarded by a reward
model or by a named reward function."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from fastalign.errors import ConfigError
from fastalign.tasks.registry import text_reward

from ..launch import (
    DATA_KEYS,
    MODEL_KEYS,
    PEFT_KEYS,
    REF_MODEL_KEY,
    RunKey,
    defaults,
    load_policy,
    load_reference,
    load_splits,
    peft_config,
)

if TYPE_CHECKING:
    from .config import PPOConfig

PPO_KEYS = MODEL_KEYS + DATA_KEYS + PEFT_KEYS + (
    REF_MODEL_KEY,
    RunKey("reward_model_name_or_path", str, "a reward model (a RewardTrainer's output dir, or a hub name) scoring "
           "query+response; it must share the policy's tokenizer"),
    RunKey("reward_function", str, "instead of a reward model: 'sort_digits' (the built-in task's sortedness) or "
           "'package.module:function' taking (queries, responses) texts, returning one float each"),
    RunKey("generation_kwargs", dict, "sampling options (max_new_tokens, top_k, top_p, temperature, ...)"),
    RunKey("num_shared_layers", int, "bottom layers the frozen reference shares with the policy (frozen in both)",
           bounds=(("ge", 0),)),
)


def check_generation_kwargs(kwargs: dict | None) -> None:
    """Sampling options ``generate`` takes, with values it accepts, before anything loads (a typo
    or ``max_new_tokens: 0`` failed only at the first generation)."""
    from transformers import GenerationConfig

    known = GenerationConfig().to_dict()
    unknown = sorted(set(kwargs or {}) - set(known))
    if unknown:
        hints = [k + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, known, n=1)) else "")
                 for k in unknown]
        raise ConfigError(f"generation_kwargs: unknown sampling option(s) {', '.join(hints)}")
    try:
        GenerationConfig(**(kwargs or {})).validate()
    except ValueError as err:
        raise ConfigError(f"generation_kwargs: {' '.join(str(err).split())}") from None


def launch_ppo(trainer_class: type, config: PPOConfig, run: dict) -> dict:
    """PPO over the run's data set of prompts."""
    run = defaults(PPO_KEYS, run)
    if bool(run["reward_model_name_or_path"]) == bool(run["reward_function"]):
        raise ConfigError("ppo needs exactly one of reward_model_name_or_path and reward_function")
    reward_fn = text_reward(run["reward_function"]) if run["reward_function"] else None
    check_generation_kwargs(run["generation_kwargs"])
    model, tokenizer = load_policy(trainer_class, run)
    prompts, _ = load_splits(run)
    trainer = trainer_class(config, model, tokenizer=tokenizer, dataset=prompts, peft_config=peft_config(run),
                            num_shared_layers=run["num_shared_layers"], reward_model=run["reward_model_name_or_path"],
                            **load_reference(run, model, tokenizer))
    return trainer.train(reward_fn, run["generation_kwargs"])
