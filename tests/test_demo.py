"""The embedded demo, shortened: it trains, measures before and after, and writes its run dir."""

import json

import pytest

from fastalign.demo import DemoSettings, run_demo

pytest.importorskip("matplotlib", reason="the demo draws its curves with matplotlib")


def test_short_demo_improves_the_task_and_writes_its_run_dir(tmp_path, capsys):
    settings = DemoSettings(train_rows=3000, eval_rows=50, sft_steps=120)
    summary = run_demo(tmp_path, settings)
    before, after = summary["stages"]
    assert before["stage"].startswith("before") and after["stage"] == "after SFT"
    assert after["reward_mean"] > before["reward_mean"] + 0.2
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert "| after SFT |" in (tmp_path / "results.md").read_text() and "| after SFT |" in capsys.readouterr().out
    assert (tmp_path / "sft" / "metrics.jsonl").exists() and (tmp_path / "sft" / "plots" / "loss.png").exists()
    assert (tmp_path / "sft" / "model.safetensors").exists()
