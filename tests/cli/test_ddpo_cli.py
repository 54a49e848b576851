"""`fastalign train ddpo`: the shipped configs build, the local one trains, its keys are checked."""

from pathlib import Path

import pytest

from fastalign import cli
from fastalign.engine.metrics import read_metrics

pytest.importorskip("diffusers", reason="DDPO needs diffusers (pip install fastalign[diffusion])")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["ddpo.yaml", "ddpo_local.yaml"])
def test_ddpo_configs_build(name):
    from fastalign.algorithms.ddpo import prompt_function, reward_function

    config, run = cli.build_config(cli.algorithms()["ddpo"][0], cli.load_config_file(ROOT / "configs" / name))
    assert run["pipeline_name_or_path"] and callable(reward_function(run["reward_function"]))
    assert callable(prompt_function(run["prompt_function"]))
    assert config.optimizer_steps_per_epoch >= 1


def test_local_ddpo_config_trains_two_epochs(tmp_path):
    out = tmp_path / "run"
    result = cli.train("ddpo", str(ROOT / "configs" / "ddpo_local.yaml"),
                       ["--output_dir", str(out), "--num_epochs", "2", "--sample_num_steps", "4",
                        "--disable_tqdm", "true"])
    assert result["epochs"] == 2 and result["reward_mean"] < 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2] and {"reward_mean", "approx_kl"} <= records[0].keys()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.parametrize("override, message", [
    (["--reward_function", "nope"], "reward_function 'nope'"),
    (["--prompt_function", "os.path:nope"], "has no function 'nope'"),
    (["--dataset_name", "x.jsonl"], "ddpo takes no dataset_name"),
])
def test_ddpo_run_keys_are_checked(tmp_path, override, message):
    with pytest.raises(SystemExit, match=message):
        cli.train("ddpo", str(ROOT / "configs" / "ddpo_local.yaml"), ["--output_dir", str(tmp_path), *override])


def test_pipeline_keys_are_for_ddpo_only():
    with pytest.raises(SystemExit, match="for ddpo, not sft"):
        cli.train("sft", None, ["--prompt_function", "animals"])
