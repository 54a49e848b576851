"""`fastalign train grpo|rloo`: the shipped configs build and train, reward_funcs are checked."""

import json
from pathlib import Path

import pytest

from fastalign import cli
from fastalign.tasks.sort_digits import make_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_shipped_config_trains_two_steps(algo, tmp_path):
    values = cli.load_config_file(ROOT / "configs" / f"{algo}.yaml")
    config, run = cli.build_config(cli.algorithms()[algo][0], values)
    assert run["dataset_name"] == "examples/prompts.jsonl" and run["reward_funcs"] == ["sort_digits"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"query": r["prompt"]}) + "\n" for r in make_rows(64, seed=0)))
    out = tmp_path / "run"
    result = cli.train(algo, str(ROOT / "configs" / f"{algo}.yaml"),
                       ["--output_dir", str(out), "--max_steps", "2", "--dataset_name", str(data),
                        "--per_device_train_batch_size", "16", "--num_generations", "4", "--max_completion_length",
                        "4", "--disable_tqdm", "true"])
    assert result["steps"] == 2 and 0 <= result["reward"] <= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "rewards/sort_digits/mean" in records[0]
    assert ("kl" in records[0]) == (algo == "rloo")  # GRPO's default beta is 0
    assert (out / "model.safetensors").exists()


def test_reward_funcs_are_required_and_named(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"query": "12="}) + "\n")
    with pytest.raises(SystemExit, match="reward_funcs"):
        cli.train("grpo", None, ["--model_name_or_path", "fastalign/tiny-llama", "--dataset_name", str(data)])
    with pytest.raises(SystemExit, match="no function 'nope'"):
        cli.train("grpo", None, ["--model_name_or_path", "fastalign/tiny-llama", "--dataset_name", str(data),
                                 "--reward_funcs", "math:nope"])
