"""The embedded demo, shortened: it trains its stages, measures before and after each, and writes
its run dir."""

import json

import pytest

from fastalign.demo import DemoSettings, run_demo

pytest.importorskip("matplotlib", reason="the demo draws its curves with matplotlib")


def test_short_demo_improves_the_task_and_writes_its_run_dir(tmp_path, capsys):
    settings = DemoSettings(train_rows=3000, eval_rows=50, pair_rows=1500, eval_pairs=100, reward_steps=150,
                            dpo_steps=150, ppo_steps=40, ppo_batch_size=32, ppo_mini_batch_size=8, grpo_steps=40,
                            ddpo_epochs=6)
    summary = run_demo(tmp_path, settings)
    before, sft, reward, dpo, ppo, grpo = summary["stages"]
    assert before["stage"].startswith("before") and sft["stage"] == "after SFT"
    assert reward["stage"].startswith("after reward model") and dpo["stage"] == "after DPO"
    assert sft["reward_mean"] > before["reward_mean"] + 0.2
    # The reward model is a copy with its own head: the policy, and so the task metric, is the SFT model's.
    assert (reward["exact_sorted"], reward["reward_mean"]) == (sft["exact_sorted"], sft["reward_mean"])
    assert reward["pair_accuracy"] > 0.55 and reward["pair_accuracy"] > reward["pair_accuracy_before"]
    # DPO ranks held-out pairs by its implicit reward and answers better than the SFT model
    # (tests/algorithms/test_dpo_learning.py holds it to a margin).
    assert dpo["pair_accuracy"] > 0.75 and dpo["reward_margin"] > 0
    assert dpo["reward_mean"] > sft["reward_mean"]
    for row in (before, sft, ppo, grpo):
        assert row["pair_accuracy"] is None
    # PPO (from the SFT model) raises the reward of its sampled answers (test_ppo_learning.py: a full run).
    assert ppo["stage"] == "after PPO (from the SFT model)"
    assert ppo["sampled_reward_last"] > ppo["sampled_reward_first"] + 0.1 and ppo["kl_last"] > 0
    # GRPO (from the SFT model) too (test_grpo_learning.py: 100 steps, +0.2 at least).
    assert grpo["stage"] == "after GRPO (from the SFT model)"
    assert grpo["sampled_reward_last"] > grpo["sampled_reward_first"] + 0.05
    # DDPO (tiny Stable Diffusion, JPEG compressibility; test_ddpo_learning.py: the full 12 epochs).
    ddpo = summary["ddpo"]
    if ddpo is not None:
        assert ddpo["reward_after"] > ddpo["reward_before"] and ddpo["epochs"] == 6
        assert (tmp_path / "ddpo" / "before_after.png").exists() and "| after DDPO (6 epochs) |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["wall_seconds"] > 0 and summary["settings"]["dpo_steps"] == 150
    results, out = (tmp_path / "results.md").read_text(), capsys.readouterr().out
    for row in summary["stages"]:
        assert f"| {row['stage']} |" in results and f"| {row['stage']} |" in out
    assert f"| {dpo['pair_accuracy']:.3f} |" in results
    for stage, loss in (("sft", "loss"), ("reward", "loss"), ("dpo", "loss"), ("ppo", "ppo_loss_total"),
                        ("grpo", "reward")):
        assert (tmp_path / stage / "metrics.jsonl").exists() and (tmp_path / stage / "plots" / f"{loss}.png").exists()
        assert (tmp_path / stage / "model.safetensors").exists()
    assert (tmp_path / "reward" / "plots" / "accuracy.png").exists()
    assert (tmp_path / "dpo" / "plots" / "rewards_accuracies.png").exists()
    assert (tmp_path / "ppo" / "plots" / "env_reward_mean.png").exists() and (tmp_path / "ppo" / "value_head.safetensors").exists()
