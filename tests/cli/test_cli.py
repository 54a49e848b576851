"""The command line: config files, overrides, unknown keys, help."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastalign import cli
from fastalign.algorithms import SFTConfig

ROOT = Path(__file__).resolve().parents[2]


def test_overrides_are_typed_by_their_field():
    values = cli.parse_overrides(["--learning_rate", "1e-4", "--bf16", "--output_dir=007", "--report_to", "[tensorboard]",
                                  "--max-steps", "3", "--dataset_name", "123"])
    config, run = cli.build_config(SFTConfig, values)
    assert config.learning_rate == 1e-4 and config.bf16 is True and config.output_dir == "007"
    assert config.report_to == ["tensorboard"] and config.max_steps == 3 and run == {"dataset_name": "123"}


def test_unknown_keys_are_named_with_a_hint():
    with pytest.raises(SystemExit, match=r"'learnin_rate' \(did you mean 'learning_rate'\?\).*'zzz'"):
        cli.build_config(SFTConfig, {"learnin_rate": 1, "zzz": 2})


def test_bad_values_are_errors_not_tracebacks():
    with pytest.raises(SystemExit, match="learning_rate expects a number"):
        cli.build_config(SFTConfig, {"learning_rate": "fast"})
    with pytest.raises(SystemExit, match="lr_scheduler_type"):
        cli.build_config(SFTConfig, {"lr_scheduler_type": "zigzag"})


def test_shipped_configs_hold_only_known_keys():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        algo = path.stem.split("_")[0]
        if algo in cli.algorithms():
            cli.build_config(cli.algorithms()[algo][0], values)


def test_train_sft_from_a_config_file(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(30)))
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "fastalign/tiny-llama", "dataset_name": str(data),
                                      "output_dir": str(tmp_path / "run"), "max_steps": 3, "learning_rate": "1e-3",
                                      "disable_tqdm": True}))
    result = cli.train("sft", str(config), ["--max_steps", "2"])
    assert result["steps"] == 2 and result["train_loss"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["padding_fraction"] == 0.0
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_help_lists_the_algorithms():
    out = subprocess.run([sys.executable, "-m", "fastalign.cli", "--help"], capture_output=True, text=True, check=True)
    assert "Algorithms: sft" in out.stdout


def test_shipped_deepspeed_presets_fill_in_from_the_config():
    from fastalign.engine.distributed import deepspeed_config

    for stage in (2, 3):
        config = SFTConfig(deepspeed=str(ROOT / "configs" / f"deepspeed_zero{stage}.json"), gradient_accumulation_steps=4,
                           max_grad_norm=0.5, bf16=True)
        ds = deepspeed_config(config)
        assert ds["zero_optimization"]["stage"] == stage and ds["gradient_accumulation_steps"] == 4
        assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True} and ds["train_micro_batch_size_per_gpu"] == 1
    with pytest.raises(ValueError, match="unknown short keys"):
        deepspeed_config(SFTConfig(deepspeed={"stag": 3}))


def test_a_key_without_a_value_is_true_only_for_a_boolean():
    config, _ = cli.build_config(SFTConfig, cli.parse_overrides(["--bf16", "--resume_from_checkpoint"]))
    assert config.bf16 is True and config.resume_from_checkpoint is True
    for key in ("--output_dir", "--max_steps"):
        with pytest.raises(SystemExit, match=f"{key} needs a value"):
            cli.build_config(SFTConfig, cli.parse_overrides([key]))
    with pytest.raises(SystemExit, match="--dataset_name needs a value"):
        cli.build_config(SFTConfig, cli.parse_overrides(["--max_steps", "3", "--dataset_name"]))


@pytest.mark.parametrize("key, hint", [("per_device_train_batch_size", "max_tokens_per_batch"), ("fp16", "bf16"),
                                       ("evaluation_strategy", "eval_steps"), ("optim", "AdamW")])
def test_training_arguments_names_say_what_to_use_instead(key, hint):
    with pytest.raises(SystemExit, match=f"'{key}' \\(.*{hint}"):
        cli.build_config(SFTConfig, {key: 1})
