"""A GRPO or RLOO run built from the command's run keys: the policy, its prompts and its rewards."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import launch as common

if TYPE_CHECKING:
    from .config import GroupConfig

GROUP_KEYS = common.MODEL_KEYS + common.DATA_KEYS + common.PEFT_KEYS + (
    common.REF_MODEL_KEY,
    common.RunKey("reward_funcs", list, "the rewards, summed with reward_weights: 'sort_digits' (the built-in "
                  "task's sortedness), 'package.module:function' (TRL's reward function: prompts and completions in, "
                  "one float each out), or a reward model (a RewardTrainer's output dir or a hub name) sharing the "
                  "policy's tokenizer", required=True),
)


def launch_group(trainer_class: type, config: GroupConfig, run: dict) -> dict:
    """GRPO or RLOO over the run's data set of prompts."""
    run = common.defaults(GROUP_KEYS, run)
    model, tokenizer = common.load_policy(trainer_class, run)
    prompts, _ = common.load_splits(run)
    trainer = trainer_class(model, run["reward_funcs"], args=config, train_dataset=prompts, processing_class=tokenizer,
                            peft_config=common.peft_config(run), **common.load_reference(run, model, tokenizer))
    return trainer.train()
