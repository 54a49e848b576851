"""`fastalign train ppo`: the shipped configs build, the local one trains, reward sources are checked."""

import json
from pathlib import Path

import pytest

from fastalign import cli
from fastalign.algorithms.ppo import reward_function
from fastalign.tasks.sort_digits import make_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["ppo.yaml", "ppo_local.yaml"])
def test_ppo_configs_build(name, monkeypatch):
    from fastalign.engine.distributed import deepspeed_config

    values = cli.load_config_file(ROOT / "configs" / name)
    config, run = cli.build_config(cli.algorithms()["ppo"][0], values)
    assert run["model_name_or_path"] and run["dataset_name"] and isinstance(run["generation_kwargs"], dict)
    assert bool(run.get("reward_function")) != bool(run.get("reward_model_name_or_path"))
    if config.deepspeed is not None:
        monkeypatch.chdir(ROOT)
        assert deepspeed_config(config)["zero_optimization"]["stage"] == 2


def test_local_ppo_config_trains_two_steps(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"query": r["prompt"]}) + "\n" for r in make_rows(64, seed=0)))
    out = tmp_path / "run"
    result = cli.train("ppo", str(ROOT / "configs" / "ppo_local.yaml"),
                       ["--output_dir", str(out), "--max_steps", "2", "--dataset_name", str(data), "--batch_size", "16",
                        "--mini_batch_size", "8", "--generation_kwargs", "{max_new_tokens: 4}", "--disable_tqdm", "true"])
    assert result["steps"] == 2 and 0 <= result["env/reward_mean"] <= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "objective/kl" in records[0]
    assert (out / "model.safetensors").exists() and (out / "value_head.safetensors").exists()


def test_ppo_needs_one_reward_source(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"query": "12="}) + "\n")
    with pytest.raises(SystemExit, match="exactly one of"):
        cli.train("ppo", None, ["--model_name_or_path", "fastalign/tiny-llama", "--dataset_name", str(data)])
    with pytest.raises(SystemExit, match="are for ppo"):
        cli.train("sft", None, ["--model_name_or_path", "fastalign/tiny-llama", "--dataset_name", str(data),
                                "--reward_function", "sort_digits"])


def test_reward_function_by_name():
    assert reward_function("sort_digits")(["3914="], ["1349"]) == [1.0]
    assert reward_function("math:hypot") is not None
    with pytest.raises(ValueError, match="no function"):
        reward_function("math:nope")
    with pytest.raises(ValueError, match="expected one of"):
        reward_function("nonsense")
