"""`fastalign train ppo`: the shipped configs build, the local one trains, reward sources are checked."""

import json
import re
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


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.mark.parametrize("extra, named", [
    (["--num_shared_layers", "-1"], "num_shared_layers must be an integer >= 0, got -1"),
    (["--generation_kwargs", "{max_new_tokens: 0}"], "generation_kwargs: `max_new_tokens` must be greater than 0"),
    (["--generation_kwargs", "{max_new_tokens: 4, bogus_option: 1}"], "unknown sampling option(s) bogus_option"),
    (["--generation_kwargs", "{max_new_token: 4}"], "max_new_token (did you mean 'max_new_tokens'?)"),
])
def test_ppo_run_keys_are_checked_before_anything_loads(tmp_path, monkeypatch, extra, named):
    # Each was a ValueError of transformers or of the reference (exit status 1) once the model had loaded.
    monkeypatch.setattr("fastalign.algorithms.ppo.launch.load_policy", _no_model)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"query": "12="}) + "\n")
    with pytest.raises(SystemExit) as exit:
        cli.train("ppo", str(ROOT / "configs" / "ppo_local.yaml"), ["--dataset_name", str(data), *extra])
    assert exit.value.code == 2 and named in str(exit.value)


def test_too_many_shared_layers_is_a_config_error():
    from fastalign.algorithms import create_reference_model
    from fastalign.errors import ConfigError
    from fastalign.models.tiny import tiny_model

    with pytest.raises(ConfigError, match=r"num_shared_layers must be in \[0, 1\] \(2 layers\), got 99"):
        create_reference_model(tiny_model(), num_shared_layers=99)


def test_a_reward_function_module_in_the_working_directory(tmp_path, monkeypatch):
    # The fastalign script's sys.path holds its own folder, not the working directory: a user's
    # myreward.py beside the config was "No module named 'myreward'".
    (tmp_path / "cwd_reward_for_test.py").write_text("def score(queries, responses):\n    return [1.0] * len(queries)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert reward_function("cwd_reward_for_test:score")(["1="], ["1"]) == [1.0]


@pytest.mark.parametrize("source, named", [
    ("def score(q, r:\n    return q\n", r"importing broken_reward_\w+ failed: SyntaxError: .* \(broken_reward_\w+\.py, line 1\)"),
    ("raise KeyError('API_TOKEN')\n", r"importing broken_reward_\w+ failed: KeyError: 'API_TOKEN'"),
])
def test_a_reward_function_module_that_fails_to_import_is_a_config_error(tmp_path, monkeypatch, source, named):
    from fastalign.errors import ConfigError

    module = f"broken_reward_{abs(hash(source)) % 10**6}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=named):
        reward_function(f"{module}:score")


@pytest.mark.parametrize("body, error, named", [
    ("return [float('nan')] * len(q)", ValueError, "returned nan for response 0: every score must be a finite number"),
    ("return [1.0]", ValueError, "returned 1 scores for 2 responses (one number each)"),
    ("return 3.0", ValueError, "returned a float for 2 responses"),
    ("return 1 / 0", RuntimeError, "failed: ZeroDivisionError: division by zero"),
])
def test_a_reward_function_that_scores_wrongly_is_named(tmp_path, monkeypatch, body, error, named):
    # PPO's step named "scores[0]" or "batch_size", not the user's function.
    module = f"bad_reward_{abs(hash(body))}"
    (tmp_path / f"{module}.py").write_text(f"def score(q, r):\n    {body}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=rf"^reward_function '{module}:score' {re.escape(named)}"):
        reward_function(f"{module}:score")(["1=", "2="], ["1", "2"])
    assert reward_function("sort_digits")(["21="], ["12"]) == [1.0]
    (tmp_path / "tensor_reward.py").write_text("import torch\ndef score(q, r):\n    return [torch.tensor(0.5)] * len(q)\n")
    assert len(reward_function("tensor_reward:score")(["1="], ["1"])) == 1  # TRL's scores: 0-d tensors
