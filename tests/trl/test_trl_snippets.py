"""The code of TRL 0.7.10's trainer docs and quickstart, written out as scripts under
``scripts/`` (imports ported to fastalign.trl, Hub names replaced by local stand-ins: each script's
header says what), run for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def evaluation(folder: Path) -> dict:
    """The last evaluation record of ``folder/metrics.jsonl``."""
    return [r for r in records(folder) if "eval_loss" in r][-1]


def test_ppo_quickstart(assets, tmp_path, run_script):
    out = tmp_path / "out"
    g = run_script(SCRIPTS / "ppo_quickstart.py", assets / "tiny", out)
    assert {"objective/kl", "ppo/loss/total", "objective/logprobs", "objective/ref_logprobs",
            "ppo/policy/entropy"} <= set(g["train_stats"])
    assert (out / "value_head.safetensors").exists()


def test_sft_docs(assets, tmp_path, run_script):
    out = tmp_path / "out"
    g = run_script(SCRIPTS / "sft_docs.py", assets / "tiny", out)
    results = g["results"]
    assert results["quickstart"].global_step == 3  # transformers' default: 3 epochs, 8 rows a batch
    assert (tmp_path / "tmp_trainer" / "metrics.jsonl").exists()
    for name in ("object", "completion", "chat", "packed"):
        assert results[name].global_step == 2, name
        assert {"loss", "learning_rate", "epoch"} <= set(records(out / name)[0])


def test_dpo_docs(assets, tmp_path, run_script):
    out = tmp_path / "out"
    g = run_script(SCRIPTS / "dpo_docs.py", assets / "tiny", out)
    assert g["result"].global_step == 2
    history = g["dpo_trainer"].state.log_history
    assert {"rewards/chosen", "rewards/margins", "logits/chosen", "learning_rate"} <= set(history[0])
    assert "train_runtime" in history[-1]


def test_iterative_sft_docs(assets, tmp_path, run_script):
    out = tmp_path / "out"
    out.mkdir()
    g = run_script(SCRIPTS / "iterative_sft_docs.py", assets / "tiny", out)
    assert [s["step"] for s in g["stats"]] == [1, 2]


def test_reward_docs(assets, tmp_path, run_script):
    out = tmp_path / "out"
    g = run_script(SCRIPTS / "reward_docs.py", assets / "tiny", out)
    assert g["prediction"].predictions.shape == (8, 2)
    assert "test_accuracy" in g["prediction"].metrics
    assert "eval_accuracy" in evaluation(out)


def test_ppo_docs(assets, tmp_path, run_script):
    out = tmp_path / "out"
    run_script(SCRIPTS / "ppo_docs.py", assets / "tiny", assets / "sentiment", out)
    assert [r["step"] for r in records(out)] == [1, 2]
    assert (out / "my_ppo_model" / "value_head.safetensors").exists()


def test_ddpo_docs(tmp_path, run_script):
    pytest.importorskip("diffusers")
    out = tmp_path / "out"
    g = run_script(SCRIPTS / "ddpo_docs.py", out)
    assert g["global_step"] == 4  # 2 samples an epoch, 1 a step: 2 optimizer steps in train(), 2 in step()
    assert len(list((out / "images").rglob("*.png"))) == 4  # the hook, in train() and in step() after it
    assert (out / "squirrel.png").exists() and (out / "saved" / "pytorch_lora_weights.safetensors").exists()
