"""Checkpoints: atomic writes, rotation, and an exact resume after a killed run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastalign.engine import checkpoint as ckpt
from fastalign.engine.metrics import read_metrics
from fastalign.models.tiny import tiny_model

# The run a test kills: a tiny SFT run, slowed to ~0.3 s per step so the kill lands mid-run. With
# "stream", the rows are read from a file as a stream, 9 rows a window (several windows a run).
RUN = """
import json, sys, time
from pathlib import Path
from fastalign.algorithms import SFTConfig, SFTTrainer
from fastalign.models.tiny import char_tokenizer, tiny_model

class Slow(SFTTrainer):
    def compute_loss(self, batch):
        time.sleep(float(sys.argv[3]))
        return super().compute_loss(batch)

rows = [{"prompt": f"{a} {b}=", "completion": str(a * b)} for a in range(7) for b in range(6)]
stream = sys.argv[4] == "stream"
if stream:
    path = Path(sys.argv[1]).with_suffix(".jsonl")
    path.write_text("".join(json.dumps(r) + "\\n" for r in rows))
    rows = str(path)
args = SFTConfig(output_dir=sys.argv[1], learning_rate=1e-2, max_steps=10, max_tokens_per_batch=64, save_steps=2,
                 save_total_limit=None, disable_tqdm=True, seed=0, neftune_noise_alpha=5.0,
                 resume_from_checkpoint=sys.argv[2] == "resume" or None, streaming=stream, stream_window_rows=9)
Slow(tiny_model("llama", hidden_size=32, layers=1, heads=2, seed=1), args=args, train_dataset=rows,
     tokenizer=char_tokenizer()).train()
"""


def run(out: Path, mode: str, delay: float, data: str = "list", **popen):
    return subprocess.Popen([sys.executable, "-c", RUN, str(out), mode, str(delay), data], **popen)


@pytest.mark.parametrize("data", ["list", "stream"])
def test_killed_run_resumes_exactly(tmp_path, data):
    whole = tmp_path / "whole"
    assert run(whole, "fresh", 0.0, data).wait(timeout=300) == 0
    killed = tmp_path / "killed"
    proc = run(killed, "fresh", 0.3, data)
    deadline = time.time() + 300
    while not (killed / "checkpoint-4").exists():  # killed after step 4's checkpoint, mid-run
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [r["step"] for r in read_metrics(killed) if "loss" in r]
    assert done[-1] < 10, "the kill landed after the run finished"
    assert run(killed, "resume", 0.0, data).wait(timeout=300) == 0
    want = [(r["step"], r["loss"]) for r in read_metrics(whole) if "loss" in r]
    got = [(r["step"], r["loss"]) for r in read_metrics(killed) if "loss" in r]
    assert [s for s, _ in got] == list(range(1, 11))  # records past the checkpoint were dropped, then redone
    assert got == want  # bit-identical: weights, optimizer, schedule, RNG (NEFTune noise) and data order
    a = ckpt.load_model_weights  # the final models agree too
    m1, m2 = tiny_model("llama", hidden_size=32, layers=1, heads=2), tiny_model("llama", hidden_size=32, layers=1, heads=2)
    a(m1, whole)
    a(m2, killed)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_saves_where_it_stopped_and_resumes_exactly(tmp_path, sig):
    # Ctrl-C or a scheduler's SIGTERM: the step under way ends, a checkpoint is saved at that step,
    # and the resumed run ends as an uninterrupted one.
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert run(whole, "fresh", 0.0).wait(timeout=300) == 0
    proc = run(stopped, "fresh", 0.3, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (stopped / "checkpoint-2").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.01)
    time.sleep(0.15)  # into step 3
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0 and "Interrupted: interrupted at step " in err  # the Python API raises Interrupted
    last = ckpt.checkpoints(stopped)[-1]
    step = int(last.name.split("-")[1])
    assert 3 <= step < 10 and f"saved {last}; resume with resume_from_checkpoint=true" in err
    assert max(r["step"] for r in read_metrics(stopped) if "loss" in r) == step  # nothing done after the save
    assert run(stopped, "resume", 0.0).wait(timeout=300) == 0
    want = [(r["step"], r["loss"]) for r in read_metrics(whole) if "loss" in r]
    assert [(r["step"], r["loss"]) for r in read_metrics(stopped) if "loss" in r] == want


def test_interrupted_says_where_to_resume():
    from fastalign.errors import Interrupted

    err = Interrupted(signal.SIGTERM, 7, 10, Path("out/checkpoint-7"))
    assert isinstance(err, KeyboardInterrupt) and err.step == 7
    assert str(err) == "interrupted at step 7 of 10: saved out/checkpoint-7; resume with resume_from_checkpoint=true"


class _Boom(RuntimeError):
    pass


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = tiny_model("llama", hidden_size=32, layers=1, heads=2)
    first = ckpt.save_checkpoint(tmp_path, 2, ckpt.hf_weights(model), {"optimizer": {}})
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def explode(*args, **kwargs):
        raise _Boom("killed mid-save")

    monkeypatch.setattr(ckpt.torch, "save", explode)  # dies after the weights were written
    with pytest.raises(_Boom):
        ckpt.save_checkpoint(tmp_path, 4, ckpt.hf_weights(model), {"optimizer": {}})
    assert ckpt.checkpoints(tmp_path) == [first]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert not list(tmp_path.glob(".tmp-*"))


def test_leftovers_of_a_killed_save_are_not_checkpoints(tmp_path):
    model = tiny_model("llama", hidden_size=32, layers=1, heads=2)
    (tmp_path / ".tmp-checkpoint-6-999").mkdir(parents=True)  # what SIGKILL mid-save leaves
    assert ckpt.latest_checkpoint(tmp_path) is None
    path = ckpt.save_checkpoint(tmp_path, 8, ckpt.hf_weights(model), {})
    assert ckpt.latest_checkpoint(tmp_path) == path and not list(tmp_path.glob(".tmp-*"))
    assert json.loads((path / "trainer_state.json").read_text())["step"] == 8


def test_rotation_keeps_the_newest(tmp_path):
    model = tiny_model("llama", hidden_size=32, layers=1, heads=2)
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path, step, ckpt.hf_weights(model), {}, save_total_limit=2)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8"]


def test_checkpoint_loads_back_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", hidden_size=32, layers=1, heads=2)
    path = ckpt.save_checkpoint(tmp_path, 1, ckpt.hf_weights(model), {})
    loaded = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    from fastalign.algorithms import SFTConfig, SFTTrainer
    from fastalign.models.tiny import char_tokenizer

    trainer = SFTTrainer(tiny_model("llama", hidden_size=32, layers=1, heads=2), tokenizer=char_tokenizer(),
                         args=SFTConfig(output_dir=str(tmp_path), resume_from_checkpoint=True, disable_tqdm=True),
                         train_dataset=[{"text": "hello"}])
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        trainer.train()


class _RunsCode:
    """Unpickled, it would create the folder ``marker``: what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("name", ["trainer_state.pt", "rng_rank0.pt"])
def test_a_checkpoint_holding_code_is_refused_and_the_code_never_runs(tmp_path, name):
    from fastalign.algorithms import SFTConfig, SFTTrainer
    from fastalign.errors import CheckpointError
    from fastalign.models.tiny import char_tokenizer

    def build(**options):
        return SFTTrainer(tiny_model("llama", hidden_size=32, layers=1, heads=2), tokenizer=char_tokenizer(),
                          args=SFTConfig(output_dir=str(tmp_path / "run"), disable_tqdm=True, max_steps=2, **options),
                          train_dataset=[{"text": "hello"}])

    path = build().save_checkpoint()
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _RunsCode(marker)}, path / name)
    with pytest.raises(CheckpointError, match=name) as err:
        build(resume_from_checkpoint=str(path)).train()
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_deepspeed_files_are_read_the_safe_way_before_deepspeed_reads_them(tmp_path):
    pytest.importorskip("deepspeed")
    from fastalign.engine.checkpoint_state import check_deepspeed_files, deepspeed_records
    from fastalign.errors import CheckpointError

    folder = tmp_path / "deepspeed" / "state"
    folder.mkdir(parents=True)
    stage, scaler = deepspeed_records()[:2]
    torch.save({"zero_stage": stage(3), "loss_scaler": scaler(1.0), "state": {0: {"exp_avg": torch.ones(2)}}},
               folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_deepspeed_files(folder.parent)  # DeepSpeed's own plain records are let through
    marker = tmp_path / "code-ran"
    torch.save({"module": _RunsCode(marker)}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
        check_deepspeed_files(folder.parent)
    assert not marker.exists()


def test_a_trainer_state_a_resume_would_refuse_is_never_saved(tmp_path):
    import numpy as np

    from fastalign.algorithms import SFTConfig, SFTTrainer
    from fastalign.models.tiny import char_tokenizer

    trainer = SFTTrainer(tiny_model("llama", hidden_size=32, layers=1, heads=2), tokenizer=char_tokenizer(),
                         args=SFTConfig(output_dir=str(tmp_path), disable_tqdm=True, max_steps=2),
                         train_dataset=[{"text": "hello"}])
    trainer.checkpointer.state = lambda: {"tracker": {"cat": [np.float64(0.5)]}}  # numpy's, not a plain float
    with pytest.raises(TypeError, match="numpy"):
        trainer.save_checkpoint()
    assert ckpt.checkpoints(tmp_path) == []


@pytest.mark.parametrize("plain", ['{"step": "two"}', '{"step": -1}', '{"step": true}', '[2]',
                                   '{"step": 2, "run": "sft"}'])
def test_a_trainer_state_json_of_the_wrong_shape_is_named(tmp_path, plain):
    from fastalign.engine.checkpoint_state import read_run
    from fastalign.errors import CheckpointError

    (tmp_path / "trainer_state.json").write_text(plain)
    with pytest.raises(CheckpointError, match="trainer_state.json") as err:
        read_run(tmp_path)
    assert "\n" not in str(err.value)
