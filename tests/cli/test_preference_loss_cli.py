"""`fastalign train orpo|cpo|simpo|kto`: the shipped local configs build through the CLI's own
parsing and train two steps on the example data, logging TRL's metric names."""

import json
from pathlib import Path

import pytest

from fastalign import cli

ROOT = Path(__file__).resolve().parents[2]
METRICS = {
    "orpo": {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies", "rewards/margins"},
    "cpo": {"nll_loss", "rewards/accuracies", "rewards/margins"},
    "simpo": {"nll_loss", "rewards/accuracies", "rewards/margins"},
    "kto": {"kl", "rewards/margins"},
}
DATA = {"orpo": "pairs.jsonl", "cpo": "pairs.jsonl", "simpo": "pairs.jsonl", "kto": "unpaired.jsonl"}


@pytest.mark.parametrize("algo", sorted(METRICS))
def test_local_config_builds(algo):
    config_class, trainer_class = cli.algorithms()[algo]
    values = cli.load_config_file(ROOT / "configs" / f"{algo}_local.yaml")
    config, run = cli.build_config(config_class, values)
    assert isinstance(config, config_class) and not config.bf16 and config.deepspeed is None
    assert run["model_name_or_path"] == "fastalign/tiny-llama" and run["dataset_name"] == f"examples/{DATA[algo]}"
    assert set(values) <= set(config.to_dict()) | set(cli.RUN_KEYS)
    assert ("ref_model_name_or_path" in {k.name for k in trainer_class.run_keys}) == (algo == "kto")


@pytest.mark.parametrize("algo", sorted(METRICS))
def test_local_config_trains_two_steps(algo, tmp_path):
    out = tmp_path / "run"
    result = cli.train(algo, str(ROOT / "configs" / f"{algo}_local.yaml"),
                       ["--output_dir", str(out), "--max_steps", "2", "--dataset_name",
                        str(ROOT / "examples" / DATA[algo]), "--max_tokens_per_batch", "512",
                        "--logging_steps", "1", "--disable_tqdm", "true"])
    assert result["steps"] == 2 and result["train_loss"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    common = {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"}
    assert common | METRICS[algo] <= set(steps[0]), sorted(steps[0])
    assert (out / "model.safetensors").exists()
