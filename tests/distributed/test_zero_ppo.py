"""DeepSpeed ZeRO on 2 CPU processes (gloo): PPO steps match one process, and ZeRO-3 generation
gathers the policy's parameters once per rollout, not once per generated token.

Three launches of ``ppo_worker.py`` (``torchrun --standalone``, as a user would run it): one plain
process, two under ZeRO-2 and two under ZeRO-3 (tiny parameters sharded:
``stage3_param_persistence_threshold`` 0).

``step`` run: 3 ``PPOTrainer.step`` calls on fixed samples that are the same on every process, so
the mean gradient over processes is the one-process gradient: the stats, the scores, the KL
coefficient and the saved weights must match the one-process run. Two statistics are over every
process's scores: with the same 8 samples on both processes they are over each score twice, so
their (unbiased) standard deviation is sqrt(2 x 7 / 15) times the one-process one. The adaptive KL
controller moves by ``batch_size x processes / horizon`` per step (TRL's global batch); the worker
sets ``horizon`` in proportion to the number of processes so the coefficient's path is the same.

``train`` run (2 processes): 2 ``train()`` steps with 4 and with 8 new tokens per response; the
collective calls made during each ``generate`` are counted by name and must not grow with the
number of new tokens. The counts without the whole-model context are printed, not asserted.

A process may abort during gloo's teardown after its work is done, so success is judged from the
files each process wrote, not from the launcher's exit code alone.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ppo_worker.py")
ZERO2 = {"stage": 2}
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
TOL = 1e-4
BATCH = 8
# Statistics of every process's scores: the identical samples of 2 processes count twice.
OVER_ALL_SCORES = {"env/reward_std", "ppo/std_scores"}
TWICE = math.sqrt(2 * (BATCH - 1) / (2 * BATCH - 1))
WEIGHT_FILES = ("model.safetensors", "value_head.safetensors")

pytest.importorskip("deepspeed", reason="needs deepspeed")

class Launch(NamedTuple):
    out: Path
    ranks: list[dict]  # each process's report, per run
    stderr: str

    def run(self, name: str) -> list[dict]:
        """Every process's report of run ``name``, which every process finished."""
        reports = [r.get(name, {}) for r in self.ranks]
        for rank, report in enumerate(reports):
            assert report.get("done"), (f"{name}: rank {rank} did not finish:\n{report.get('error', '')}\n"
                                        f"{self.stderr[-3000:]}")
        return reports


def launch(out: Path, config, nproc: int, runs: list[str]) -> Launch:
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           str(out), json.dumps(config) if config else "none", ",".join(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
    paths = [out / f"rank{r}.json" for r in range(nproc)]
    ranks = [json.loads(path.read_text()) if path.exists() else {} for path in paths]
    return Launch(out, ranks, f"(exit {done.returncode})\n{done.stderr}")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one plain-torch process."""
    done = launch(tmp_path_factory.mktemp("single") / "run", None, 1, ["step"])
    (report,) = done.run("step")
    assert report["stage"] is None and report["world"] == 1
    return done


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("zero2") / "run", ZERO2, 2, ["step", "train"])


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("zero3") / "run", ZERO3, 2, ["step", "train"])


def assert_same_steps(want: Launch, got: Launch, world: int) -> dict:
    """Every process's 3 steps agree with the one-process run: the scores, every scalar stat, the KL
    coefficient, then the saved weights (the ZeRO-3 ones gathered from the shards). Returns the
    largest differences (stats, scores, weights)."""
    (a,) = want.run("step")
    worst = {"stats": (0.0, None), "scores": 0.0, "kl_coef": 0.0}
    for b in got.run("step"):
        assert b["world"] == world and len(a["steps"]) == len(b["steps"]) == 3
        for n, (sa, sb) in enumerate(zip(a["steps"], b["steps"])):
            assert sb["scores"] == pytest.approx(sa["scores"], abs=TOL), n
            worst["scores"] = max(worst["scores"], max(abs(x - y) for x, y in zip(sa["scores"], sb["scores"])))
            assert sa["stats"].keys() == sb["stats"].keys(), n
            for key, value in sa["stats"].items():
                expected = value * TWICE if key in OVER_ALL_SCORES and world > 1 else value
                assert sb["stats"][key] == pytest.approx(expected, abs=TOL, rel=TOL), (n, key)
                if abs(sb["stats"][key] - expected) > worst["stats"][0]:
                    worst["stats"] = (abs(sb["stats"][key] - expected), key)
            assert sb["kl_coef"] == pytest.approx(sa["kl_coef"], abs=TOL), n
            worst["kl_coef"] = max(worst["kl_coef"], abs(sb["kl_coef"] - sa["kl_coef"]))
    for name in WEIGHT_FILES:
        wa, wb = load_file(want.out / "step" / name), load_file(got.out / "step" / name)
        assert wa.keys() == wb.keys(), name
        worst[name] = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert worst[name] < TOL, (name, worst[name])
    print(f"\nlargest differences from one process ({world} processes, stage {b['stage']}): {worst}")
    return worst


def test_single_process_step_run_is_meaningful(single):
    """The run compared against exercises what it should: several packed rows per rollout, an
    adaptive KL coefficient that moves, a policy and a value head that train."""
    (report,) = single.run("step")
    assert all(step["rows"] >= 2 for step in report["steps"])
    coefs = [step["kl_coef"] for step in report["steps"]]
    assert coefs[0] < 0.2 - 1e-3 and len(set(coefs)) == 3, coefs
    assert all(math.isfinite(v) for step in report["steps"] for v in step["stats"].values())
    from fastalign.models.tiny import tiny_model

    before = tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=1).state_dict()
    after = load_file(single.out / "step" / "model.safetensors")
    assert max(float((after[k] - before[k]).abs().max()) for k in after) > 1e-3


def test_zero2_step_matches_one_process(single, zero2):
    for report in zero2.run("step"):
        assert report["stage"] == 2
        assert report["held"][0] == report["held"][1] and report["ref_held"][0] == report["ref_held"][1]
    assert_same_steps(single, zero2, world=2)


def test_zero3_reference_and_reward_models_are_sharded(zero3):
    """Under ZeRO-3 the policy, the default reference (a frozen copy) and the reward model are each
    held about half on each process (read at the trainer's creation, before any step)."""
    reports = [r.get("step", {}) for r in zero3.ranks]
    for rank, report in enumerate(reports):
        assert "ref_held" in report, f"rank {rank} made no trainer:\n{zero3.stderr[-3000:]}"
        assert report["stage"] == 3 and report["world"] == 2
        for key in ("held", "ref_held", "reward_held"):
            held, total = report[key]
            assert 0.45 <= held / total <= 0.55, (rank, key, report[key])
        assert report["ref_held"][1] < report["held"][1]  # the reference has no value head


def test_zero3_step_matches_one_process(single, zero3):
    assert_same_steps(single, zero3, world=2)


def generation_counts(reports: list[dict], key: str) -> list[dict]:
    """Per process, per ``generate`` call of ``key``: the collective calls made, by name."""
    return [[call.get("collectives", call) for call in report.get(key, [])] for report in reports]


def test_zero2_train_draws_different_prompts_and_generates_without_collectives(zero2):
    reports = zero2.run("train")
    for report in reports:
        assert report["stage"] == 2 and report["k4_steps_run"] == report["k8_steps_run"] == 2
        for k in (4, 8):
            assert len(report[f"k{k}"]) == 2  # a generate per step
            for call in report[f"k{k}"]:
                assert call["lengths"] == [k] * 4 and call["collectives"] == {}, call
    assert reports[0]["k4"][0]["queries"] != reports[1]["k4"][0]["queries"]  # the DistributedSampler


def test_zero3_generation_gathers_the_policy_once_per_rollout(zero3):
    """With 4 or with 8 new tokens per response, ``generate`` makes the same collective calls: the
    whole policy gathered once (one all-gather per parameter), not every layer for every token."""
    reports = zero3.run("train")
    print(f"\nZeRO-3 generate collectives, whole-model context: 4 new tokens {generation_counts(reports, 'k4')}, "
          f"8 new tokens {generation_counts(reports, 'k8')}; per-module hooks (reported only): 4 new tokens "
          f"{generation_counts(reports, 'k4_per_module')}, 8 new tokens {generation_counts(reports, 'k8_per_module')}")
    for report in reports:
        assert report["stage"] == 3 and report["k4_steps_run"] == report["k8_steps_run"] == 2
        held, total = report["ref_held"]
        assert held < total
        calls = {k: report[f"k{k}"] for k in (4, 8)}
        for k, made in calls.items():
            assert len(made) == 2 and all(call["lengths"] == [k] * 4 for call in made), (k, made)
        counts = [call["collectives"] for k in (4, 8) for call in calls[k]]
        assert counts[0] and all(c == counts[0] for c in counts), counts
        assert sum(counts[0].values()) <= report["params"], counts  # at most one gather per parameter
    assert reports[0]["k4"][0]["queries"] != reports[1]["k4"][0]["queries"]  # the DistributedSampler


def test_saved_weights_are_complete(single, zero2):
    """The saved files hold the whole policy: the language model and the value head."""
    for launched in (single, zero2):
        lm = load_file(launched.out / "step" / "model.safetensors")
        head = load_file(launched.out / "step" / "value_head.safetensors")
        assert set(head) == {"v_head.summary.weight", "v_head.summary.bias"}
        assert sum(t.numel() for t in lm.values()) + sum(t.numel() for t in head.values()) == \
            launched.run("step")[0]["held"][1]
        assert all(torch.isfinite(t).all() for t in lm.values())
