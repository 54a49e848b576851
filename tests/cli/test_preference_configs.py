"""The shipped DPO and reward configs: every key builds through the CLI's own parsing, and the
local (tiny-model, CPU) ones train end to end."""

import json
from pathlib import Path

import pytest

from fastalign import cli
from fastalign.tasks.sort_digits import make_preference_pairs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"dpo.yaml": "dpo", "reward.yaml": "reward", "dpo_local.yaml": "dpo", "reward_local.yaml": "reward"}
LOCAL = ["dpo_local.yaml", "reward_local.yaml"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_builds_through_the_cli(name, monkeypatch):
    """A misspelt key, a bad value or a missing deepspeed file fails here, as in `fastalign train`."""
    from fastalign.engine.distributed import deepspeed_config

    algo = CONFIGS[name]
    config_class = cli.algorithms()[algo][0]
    values = cli.load_config_file(ROOT / "configs" / name)
    config, run = cli.build_config(config_class, values)
    assert isinstance(config, config_class)
    assert run["model_name_or_path"] and run["dataset_name"]
    assert set(values) <= {f for f in config.to_dict()} | set(cli.RUN_KEYS)
    if config.deepspeed is not None:  # paths are relative to the repository root, where it is run
        monkeypatch.chdir(ROOT)
        assert deepspeed_config(config)["zero_optimization"]["stage"] in (2, 3)


def _built(name):
    return cli.build_config(cli.algorithms()[CONFIGS[name]][0], cli.load_config_file(ROOT / "configs" / name))


def test_hub_configs_are_for_gpus_and_local_ones_for_cpus():
    for name in ("dpo.yaml", "reward.yaml"):
        config, run = _built(name)
        assert config.bf16 and run["dtype"] == "float32" and run["dataset_name"] == "Anthropic/hh-rlhf"
    for name in LOCAL:
        config, run = _built(name)
        assert not config.bf16 and config.deepspeed is None and run["model_name_or_path"] == "fastalign/tiny-llama"


@pytest.mark.parametrize("name", LOCAL)
def test_local_config_trains_two_steps(name, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in make_preference_pairs(40, seed=0)))
    out = tmp_path / "run"
    result = cli.train(CONFIGS[name], str(ROOT / "configs" / name),
                       ["--output_dir", str(out), "--max_steps", "2", "--dataset_name", str(data),
                        "--logging_steps", "1", "--disable_tqdm", "true"])
    assert result["steps"] == 2 and result["train_loss"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["padding_fraction"] == 0.0 for r in steps)
    assert (out / "model.safetensors").exists()
