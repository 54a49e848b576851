"""Config checks: every field of every config is checked for its type and range when the config is
built (Python API and CLI alike), and a mistake is a ConfigError naming the key and the value."""

import dataclasses
import math

import pytest

from fastalign.algorithms import DDPOConfig, DPOConfig, IterativeSFTConfig, PPOConfig, RewardConfig, SFTConfig
from fastalign.engine import TrainingConfig
from fastalign.errors import ConfigError

CONFIGS = [TrainingConfig, SFTConfig, RewardConfig, DPOConfig, PPOConfig, DDPOConfig, IterativeSFTConfig]


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_checked_for_its_type(config_class):
    for field in dataclasses.fields(config_class):
        with pytest.raises(ConfigError, match=rf"^{field.name} must be .*, got <object object"):
            config_class(**{field.name: object()})


@pytest.mark.parametrize("config_class, key, value", [
    (SFTConfig, "max_grad_norm", -1.0),  # clipping would flip the gradient
    (SFTConfig, "bf16", "maybe"),
    (SFTConfig, "save_steps", -1),  # would save every step
    (SFTConfig, "eval_steps", 0),
    (SFTConfig, "logging_steps", 0),
    (SFTConfig, "weight_decay", -0.1),
    (SFTConfig, "learning_rate", math.nan),
    (SFTConfig, "adam_beta2", 1.0),
    (SFTConfig, "max_steps", 2.5),
    (SFTConfig, "max_steps", True),  # a bool is not a count
    (SFTConfig, "max_steps", "abc"),
    (SFTConfig, "max_steps", -2),
    (SFTConfig, "seed", "abc"),
    (SFTConfig, "seed", 2**32),  # numpy seeds take 32 bits
    (DDPOConfig, "seed", -1),
    (SFTConfig, "lr_scheduler_type", "zigzag"),
    (SFTConfig, "truncation_mode", "middle"),
    (SFTConfig, "report_to", [1]),
    (SFTConfig, "deepspeed", 3),
    (SFTConfig, "max_length", 0),
    (RewardConfig, "center_rewards_coefficient", -1.0),
    (DPOConfig, "label_smoothing", 0.7),
    (DPOConfig, "average_log_prob", "yes please"),
    (PPOConfig, "vf_coef", -1.0),
    (PPOConfig, "kl_penalty", "k4"),
    (PPOConfig, "score_clip", 0.0),
    (DDPOConfig, "train_max_grad_norm", -1.0),
    (DDPOConfig, "train_adam_weight_decay", -1e-4),
    (DDPOConfig, "use_lora", "yes"),
    (DDPOConfig, "num_checkpoint_limit", 0),
    (IterativeSFTConfig, "per_device_train_batch_size", 2.5),
])
def test_a_bad_value_is_named_with_what_was_expected(config_class, key, value):
    with pytest.raises(ConfigError) as err:
        config_class(**{key: value})
    message = str(err.value)
    assert message.startswith(f"{key} must be ") and message.endswith(f", got {value!r}") and "\n" not in message


def test_good_values_pass_and_keep_their_meaning():
    config = SFTConfig(max_grad_norm=0, learning_rate=1, warmup_ratio=1, save_steps=None, report_to="tensorboard",
                       deepspeed={"stage": 2}, resume_from_checkpoint=True, max_length=None)
    assert config.max_grad_norm == 0 and config.learning_rate == 1 and config.report_to == ["tensorboard"]
    assert DDPOConfig(report_to="tensorboard", resume_from="runs/x").report_to == ("tensorboard",)
    assert DPOConfig(loss_type="ipo").average_log_prob is True


@pytest.mark.parametrize("config_class, key, value", [
    (SFTConfig, "learning_rate", math.inf),  # every weight NaN after the first step
    (SFTConfig, "max_grad_norm", math.inf),
    (DPOConfig, "beta", math.inf),
    (PPOConfig, "target", -math.inf),
    (DDPOConfig, "train_learning_rate", math.inf),
])
def test_a_number_must_be_finite(config_class, key, value):
    with pytest.raises(ConfigError, match=rf"^{key} must be .*, got {value!r}$"):
        config_class(**{key: value})


@pytest.mark.parametrize("deepspeed, named", [
    ({"stage": 7}, r"^deepspeed: ZeRO stage must be 0, 1, 2 or 3, got 7$"),
    ({"stagee": 2}, r"^deepspeed: unknown short keys \['stagee'\]"),
    ({"stage": 2, "offload_param": True}, r"^deepspeed: offload_param needs ZeRO stage 3$"),
    ("ds.json", r"^deepspeed config .*ds.json: not valid JSON \(Expecting property name"),
])
def test_a_bad_deepspeed_setting_is_named_when_the_config_is_built(tmp_path, deepspeed, named):
    # These were ValueErrors (exit status 1) raised once the model was loaded, or a bare JSONDecodeError.
    (tmp_path / "ds.json").write_text("{stage: 2,")
    value = str(tmp_path / deepspeed) if isinstance(deepspeed, str) else deepspeed
    with pytest.raises(ConfigError, match=named):
        SFTConfig(deepspeed=value)
    assert SFTConfig(deepspeed={"stage": 3, "offload_param": True}).deepspeed["stage"] == 3
