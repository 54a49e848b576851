"""DeepSpeed ZeRO on 2 CPU processes (gloo): 5 DPO steps, and 5 reward-model steps, match one
process on the same global batch, under ZeRO-2 and under ZeRO-3 with the reference sharded.

Each launch is ``torchrun --standalone`` as a user would run it, and trains several runs one after
the other (``dpo_worker.py``) to keep the launches few. The one-process runs accumulate 4
micro-batches per step, the two-process runs 2 per process. 44 pairs make 19 micro-batches, so
step 5 has 3: under two processes one of them runs a weight-0 copy beside its real micro-batch.
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
from safetensors.torch import load_file

from fastalign.engine.metrics import read_metrics

WORKER = Path(__file__).with_name("dpo_worker.py")
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
# Logged values that depend on the machine, not on the maths.
UNCOMPARED = {"seconds_per_step", "tokens_per_s", "peak_memory_gb"}

pytest.importorskip("deepspeed", reason="needs deepspeed")


class Launch(NamedTuple):
    out: Path
    ranks: list[dict]  # each process's report, per run it finished
    stderr: str

    def finished(self, run: str) -> None:
        """Every process finished ``run`` (else: the end of the launcher's stderr)."""
        missing = [r for r, report in enumerate(self.ranks) if run not in report]
        assert not missing, f"{run}: ranks {missing} did not finish:\n{self.stderr[-4000:]}"


def launch(out: Path, config, gas: int, nproc: int, runs: list[str]) -> Launch:
    """Run the worker's ``runs`` one after the other on ``nproc`` processes."""
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           str(out), json.dumps(config) if config else "none", str(gas), ",".join(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    paths = [out / f"rank{r}.json" for r in range(nproc)]
    ranks = [json.loads(path.read_text()) if path.exists() else {} for path in paths]
    return Launch(out, ranks, f"(exit {done.returncode})\n{done.stderr}")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference runs: one plain-torch process, 4 micro-batches accumulated per step."""
    runs = ["dpo", "dpo-precompute", "reward", "dpo:40"]
    done = launch(tmp_path_factory.mktemp("single") / "run", None, gas=4, nproc=1, runs=runs)
    for run in runs:
        done.finished(run)
    assert all(r["stage"] is None and r["world"] == 1 for r in done.ranks[0].values())
    return done.out


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    """Two processes under ZeRO-2, 2 micro-batches each per step."""
    return launch(tmp_path_factory.mktemp("zero2") / "run", {"stage": 2}, gas=2, nproc=2,
                  runs=["dpo", "reward", "dpo:40"])


def records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


def assert_same_run(want: Path, got: Path, tol: float = 1e-4) -> tuple[float, float]:
    """Two runs' 5 steps agree: losses and every other logged value, then the saved weights (the
    ZeRO-3 ones gathered from the shards). Returns the largest loss and weight differences."""
    a, b = records(want), records(got)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=tol)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - UNCOMPARED:
            assert rb[key] == pytest.approx(ra[key], abs=tol), (ra["step"], key)
    wa, wb = load_file(want / "model.safetensors"), load_file(got / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < tol, worst
    return max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)), worst


def test_single_process_reference_runs(single):
    """The runs compared against are meaningful: DPO starts at log 2 (policy = reference) and
    moves away from it; precomputed reference log-probs give exactly the same run."""
    dpo = [r["loss"] for r in records(single / "dpo")]
    assert dpo[0] == pytest.approx(math.log(2), abs=1e-6)
    assert max(abs(x - math.log(2)) for x in dpo[1:]) > 1e-2
    assert_same_run(single / "dpo", single / "dpo-precompute", tol=1e-6)


def test_zero2_dpo_and_reward_match_one_process(single, zero2):
    zero2.finished("dpo")
    zero2.finished("reward")
    out = zero2.out
    for report in zero2.ranks:
        for run in (report["dpo"], report["reward"]):
            assert run["stage"] == 2 and run["world"] == 2 and run["batches"] == 19 and run["steps_run"] == 5
            assert run["held"][0] == run["held"][1]
        ref = report["dpo"]["ref"]  # a full, frozen replica, separate from the trained model
        assert ref["held"][0] == ref["held"][1] == report["dpo"]["held"][1], ref
        assert not ref["grad"] and not ref["training"] and ref["separate"] and ref["drift"] == 0.0, ref
    assert_same_run(single / "dpo", out / "dpo")
    assert_same_run(single / "reward", out / "reward")


def test_zero3_dpo_with_sharded_reference_matches_one_process(tmp_path, single):
    """The default reference (a frozen copy of the model) is sharded like the trained model under
    ZeRO-3; reference log-probs precomputed under ZeRO-3 give the same run as well."""
    done = launch(tmp_path / "run", ZERO3, gas=2, nproc=2, runs=["dpo", "dpo-precompute"])
    done.finished("dpo")
    done.finished("dpo-precompute")
    out = done.out
    for report in done.ranks:
        for run in report.values():
            assert run["stage"] == 3 and run["world"] == 2 and run["batches"] == 19 and run["steps_run"] == 5
            held, total = run["held"]
            assert 0.45 <= held / total <= 0.55, run  # the trained model: about half on each process
        ref = report["dpo"]["ref"]
        held, total = ref["held"]
        assert total == report["dpo"]["held"][1] and 0.45 <= held / total <= 0.55, ref
        assert not ref["grad"] and not ref["training"] and ref["separate"] and ref["drift"] == 0.0, ref
        assert report["dpo-precompute"]["ref"] is None  # dropped once its log-probs are stored
    assert_same_run(single / "dpo", out / "dpo")
    assert_same_run(single / "dpo-precompute", out / "dpo-precompute")


def test_zero2_dpo_step_with_a_process_left_only_weight0_copies(single, zero2):
    """40 pairs make 17 micro-batches: step 5 has one, so the second process runs only weight-0
    copies in it, and must still all-reduce the same logged values as the first."""
    zero2.finished("dpo:40")
    assert_same_run(single / "dpo-40", zero2.out / "dpo-40")
