"""An output folder belongs to one run: a new run never writes over another's checkpoints, model or
metrics; a resume only takes a checkpoint of the same run (model, data, a step within the run) and
goes on along the schedule of the run it is now."""

import json

import pytest

from fastalign.algorithms import PPOConfig, PPOTrainer, SFTConfig, SFTTrainer
from fastalign.engine import checkpoint as ckpt
from fastalign.engine.metrics import read_metrics
from fastalign.errors import CheckpointError
from fastalign.models.tiny import char_tokenizer, tiny_model

ROWS = [{"prompt": f"{a} {b}=", "completion": str(a * b)} for a in range(7) for b in range(6)]


def trainer(out, rows=ROWS, hidden=32, **overrides):
    options = dict(output_dir=str(out), learning_rate=1e-2, max_steps=6, max_tokens_per_batch=64, save_steps=2,
                   save_total_limit=2, disable_tqdm=True, seed=0)
    options.update(overrides)
    model = tiny_model("llama", hidden_size=hidden, layers=1, heads=2, seed=1)
    return SFTTrainer(model, args=SFTConfig(**options), train_dataset=rows, tokenizer=char_tokenizer())


def snapshot(folder):
    """Every file of ``folder`` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_of(checkpoint):
    return json.loads((checkpoint / "trainer_state.json").read_text())["step"]


@pytest.fixture(scope="module")
def used(tmp_path_factory):
    """A finished 6-step run: checkpoints 4 and 6, its model and its metrics."""
    out = tmp_path_factory.mktemp("used") / "run"
    trainer(out).train()
    return out


def test_a_new_run_into_a_used_output_dir_is_refused_and_touches_nothing(used):
    before = snapshot(used)
    with pytest.raises(CheckpointError) as err:
        trainer(used, max_steps=4).train()
    message = str(err.value)
    assert "\n" not in message and str(used) in message
    assert "resume_from_checkpoint" in message and "overwrite_output_dir" in message
    assert snapshot(used) == before


def test_overwrite_output_dir_starts_anew_and_keeps_the_new_runs_checkpoints(used, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for path, data in snapshot(used).items():  # a copy of the used folder, left for the other tests
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    trainer(out, max_steps=4, overwrite_output_dir=True).train()
    found = ckpt.checkpoints(out)
    assert [p.name for p in found] == ["checkpoint-2", "checkpoint-4"]  # the old run's 4 and 6 are gone
    assert [steps_of(p) for p in found] == [2, 4]
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]
    assert ckpt.latest_checkpoint(out).name == "checkpoint-4"


def test_resume_refuses_a_checkpoint_past_the_end_of_the_run(used):
    before = snapshot(used)
    with pytest.raises(CheckpointError) as err:
        trainer(used, max_steps=4, resume_from_checkpoint=True).train()
    message = str(err.value)
    assert "\n" not in message and "checkpoint-6" in message and "step 6" in message and "4" in message
    assert snapshot(used) == before


@pytest.mark.parametrize("other, what", [(dict(hidden=48), "model"), (dict(rows=ROWS[:30]), "data")])
def test_resume_refuses_a_checkpoint_of_another_model_or_data_set(used, other, what):
    before = snapshot(used)
    with pytest.raises(CheckpointError, match=what) as err:
        trainer(used, resume_from_checkpoint=str(used / "checkpoint-4"), **other).train()
    assert "\n" not in str(err.value) and "checkpoint-4" in str(err.value)
    assert snapshot(used) == before


def test_a_longer_resumed_run_follows_its_own_schedule_and_names_its_checkpoint(tmp_path, capsys):
    whole = tmp_path / "whole"
    trainer(whole, max_steps=8, save_steps=None).train()
    short = tmp_path / "short"
    trainer(short, max_steps=4, save_steps=4).train()
    capsys.readouterr()
    trainer(short, max_steps=8, save_steps=None, resume_from_checkpoint=True).train()
    assert f"resumed from {short / 'checkpoint-4'}" in capsys.readouterr().err
    rates = {r["step"]: r["lr"] for r in read_metrics(whole) if "lr" in r}
    resumed = {r["step"]: r["lr"] for r in read_metrics(short) if "lr" in r and r["step"] > 4}
    assert resumed == {step: rates[step] for step in range(5, 9)}  # the 8-step schedule from step 5 on
    assert all(rate > 0 for rate in resumed.values())


def test_a_new_ppo_run_into_a_used_output_dir_is_refused(tmp_path):
    prompts = [{"query": f"{a} {b}="} for a in range(4) for b in range(4)]

    def train(**options):
        config = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=1, max_steps=1, output_dir=str(tmp_path),
                           disable_tqdm=True, **options)
        model = tiny_model("llama", hidden_size=32, layers=1, heads=2, seed=1)
        trainer = PPOTrainer(config, model, tokenizer=char_tokenizer(), dataset=prompts)
        return trainer.train(lambda queries, responses: [float(len(r)) for r in responses], {"max_new_tokens": 4})

    train()
    logged = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="overwrite_output_dir"):
        train()
    assert (tmp_path / "metrics.jsonl").read_text() == logged
    assert train(overwrite_output_dir=True)["steps"] == 1
