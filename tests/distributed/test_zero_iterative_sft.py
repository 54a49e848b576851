"""DeepSpeed ZeRO on 2 CPU processes (gloo): ``IterativeSFTTrainer.step`` with each process giving
its own rows matches one process given all of them, under ZeRO-2 and ZeRO-3 (tiny parameters
sharded: ``stage3_param_persistence_threshold`` 0).

Three launches of ``iterative_sft_worker.py`` (``torchrun --standalone``, as a user would run it):
one plain process, two under ZeRO-2 and two under ZeRO-3. Each run is 3 ``step`` calls on 9 fixed
odd-length rows per call; process R of 2 gets rows R::2 (5 rows and 4), the one process all 9. An
optimizer step averages over every process's target tokens, so the loss (the mean over the call's
target tokens), the grad norm, the counts and the weights after the 3 calls (SGD, learning rate 1)
match the one-process run:

``full``
    One optimizer step per call (no ``per_device_train_batch_size``), no clipping. The processes
    pack their rows into different numbers of micro-batches: the one with fewer runs weight-0
    copies so that both run as many forwards.
``minibatch``
    Mini-batches (4 rows over all processes, 2 accumulated), not shuffled, clipped at norm 1: 2
    optimizer steps per call, the same rows in each as one process with mini-batches of 4. In each
    call's second step the second process has no row left and runs only weight-0 copies.
``minibatch-shuffled`` (ZeRO-2 only)
    The same, each process shuffling its own rows: no one-process equivalent, so only what is
    well-defined is asserted (as many optimizer steps on every process, the same stats, finite
    losses, identical weights).

Largest differences from one process measured on a 2-core CPU (one thread per process, the same
on every launch; printed by the tests): loss 1.7e-7 under both stages; grad norm 4.2e-7 relative
under ZeRO-2, 5.8e-7 under ZeRO-3 (both in the mini-batch run); weights 2.6e-7 under ZeRO-2,
1.2e-7 under ZeRO-3. The tolerances below are these with a margin of 2-8x. About 45 s on an idle
machine, most of it the three launches' imports.

A process may abort during gloo's teardown after its work is done, so success is judged from the
files each process wrote, not from the launcher's exit code alone.
"""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("iterative_sft_worker.py")
ZERO2 = {"stage": 2}
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
# Per ZeRO stage: the loss (absolute), the grad norm (relative), the saved weights (absolute).
TOL = {2: {"loss": 1e-6, "grad_norm": 1e-6, "weights": 1e-6},
       3: {"loss": 1e-6, "grad_norm": 2e-6, "weights": 1e-6}}
# Stats that are counts or set values: exactly the one-process ones.
EXACT = {"optimizer_steps", "rows", "truncated", "dropped", "num_tokens", "num_loss_tokens", "learning_rate"}
ROWS = (5, 4)  # rows 0::2 and 1::2 of each call's 9

pytest.importorskip("deepspeed", reason="needs deepspeed")


class Launch(NamedTuple):
    out: Path
    ranks: list[dict]  # each process's report, per run
    stderr: str

    def run(self, name: str) -> list[dict]:
        """Every process's report of run ``name``, which every process finished."""
        reports = [r.get(name, {}) for r in self.ranks]
        for rank, report in enumerate(reports):
            assert report.get("done") and report.get("saved"), (
                f"{name}: rank {rank} did not finish:\n{report.get('error', '')}\n{self.stderr[-3000:]}")
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
    """The reference: one plain-torch process given every row."""
    done = launch(tmp_path_factory.mktemp("single") / "run", None, 1, ["full", "minibatch"])
    for run in ("full", "minibatch"):
        (report,) = done.run(run)
        assert report["stage"] is None and report["world"] == 1
    return done


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("zero2") / "run", ZERO2, 2, ["full", "minibatch", "minibatch-shuffled"])


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("zero3") / "run", ZERO3, 2, ["full", "minibatch"])


def assert_own_rows_and_as_many_forwards(reports: list[dict], steps_per_call: int) -> None:
    """Each process trained on its own rows (every token of them in a forward that counts), ran as
    many optimizer steps as the other, and in each of them as many forwards."""
    for rank, report in enumerate(reports):
        assert report["world"] == 2 and len(report["steps"]) == 3, rank
        for n, step in enumerate(report["steps"]):
            assert step["rows"] == ROWS[rank], (rank, n)
            assert sum(tokens for _, tokens, counts in step["forwards"] if counts) == step["tokens"], (rank, n)
            assert step["stats"]["optimizer_steps"] == steps_per_call, (rank, n)
            assert step["global_step"] == steps_per_call * (n + 1), (rank, n)
    for n in range(3):
        per_step = [Counter(s for s, _, _ in report["steps"][n]["forwards"]) for report in reports]
        assert len(per_step[0]) == steps_per_call and per_step[0] == per_step[1], (n, per_step)


def fillers(reports: list[dict]) -> list[int]:
    """Weight-0 forwards per process over the run."""
    return [sum(not counts for step in report["steps"] for _, _, counts in step["forwards"]) for report in reports]


def assert_same_steps(want: Launch, got: Launch, run: str, stage: int) -> dict:
    """Every process's 3 calls agree with the one-process run's: the counts exactly, the loss and
    the grad norm within the stage's tolerance; the processes' stats are the same (all-reduced) and
    so are their whole weights; the saved weights (gathered from the shards under ZeRO-3) match the
    one-process ones. Returns the largest differences."""
    tol = TOL[stage]
    (a,) = want.run(run)
    reports = got.run(run)
    worst = {"loss": 0.0, "grad_norm_rel": 0.0, "weights": 0.0}
    for rank, b in enumerate(reports):
        assert b["stage"] == stage and b["world"] == 2
        assert len(b["steps"]) == len(a["steps"]) == 3
        for n, (sa, sb) in enumerate(zip(a["steps"], b["steps"])):
            want_stats, got_stats = sa["stats"], sb["stats"]
            assert want_stats.keys() == got_stats.keys(), (rank, n)
            assert {k: got_stats[k] for k in EXACT} == {k: want_stats[k] for k in EXACT}, (rank, n)
            assert got_stats == reports[0]["steps"][n]["stats"], (rank, n)  # all-reduced: the same everywhere
            loss = abs(got_stats["loss"] - want_stats["loss"])
            norm = abs(got_stats["grad_norm"] - want_stats["grad_norm"]) / want_stats["grad_norm"]
            assert loss <= tol["loss"], (rank, n, got_stats["loss"], want_stats["loss"])
            assert norm <= tol["grad_norm"], (rank, n, got_stats["grad_norm"], want_stats["grad_norm"])
            worst["loss"], worst["grad_norm_rel"] = max(worst["loss"], loss), max(worst["grad_norm_rel"], norm)
        assert sb["global_step"] == sa["global_step"], rank
    assert reports[0]["digest"] == reports[1]["digest"]  # the processes' weights, bit for bit
    wa, wb = load_file(want.out / run / "model.safetensors"), load_file(got.out / run / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst["weights"] = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst["weights"] <= tol["weights"], worst
    print(f"\n{run}, ZeRO-{stage}: largest differences from one process {worst}")
    return worst


def test_single_process_runs_are_meaningful(single):
    """The runs compared against exercise what they should: several micro-batches per call, prompts
    without loss, finite losses, weights that move; mini-batches clipped (grad norm above 1)."""
    from fastalign.models.tiny import tiny_model

    before = tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=1).state_dict()
    for run, steps_per_call in (("full", 1), ("minibatch", 2)):
        (report,) = single.run(run)
        for n, step in enumerate(report["steps"]):
            stats = step["stats"]
            assert stats["rows"] == step["rows"] == 9 and stats["optimizer_steps"] == steps_per_call, (run, n)
            assert step["global_step"] == steps_per_call * (n + 1)
            assert len(step["forwards"]) >= 5 and all(counts for _, _, counts in step["forwards"]), (run, n)
            assert stats["num_tokens"] == step["tokens"] and 0 < stats["num_loss_tokens"] < stats["num_tokens"]
            assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]), (run, n)
            if run == "minibatch":
                assert stats["grad_norm"] > 1.0, n  # clipping at 1 acts
        assert len({step["stats"]["loss"] for step in report["steps"]}) == 3
        after = load_file(single.out / run / "model.safetensors")
        assert max(float((after[k] - before[k]).abs().max()) for k in after) > 1e-2, run


def test_zero2_full_step_matches_one_process(single, zero2):
    reports = zero2.run("full")
    assert_own_rows_and_as_many_forwards(reports, steps_per_call=1)
    assert sum(fillers(reports)) > 0  # some forwards were weight-0 copies
    for report in reports:
        assert report["held"][0] == report["held"][1]
    assert_same_steps(single, zero2, "full", stage=2)


def test_zero3_full_step_matches_one_process(single, zero3):
    reports = zero3.run("full")
    assert_own_rows_and_as_many_forwards(reports, steps_per_call=1)
    assert sum(fillers(reports)) > 0
    for report in reports:
        held, total = report["held"]
        assert 0.45 <= held / total <= 0.55, report["held"]  # about half on each process
    assert_same_steps(single, zero3, "full", stage=3)


def assert_second_process_idles_in_second_steps(reports: list[dict]) -> None:
    """In each call's second optimizer step the first process trains on its last row and the
    second, with no row left, runs only weight-0 copies."""
    for n in range(3):
        last = 2 * (n + 1)
        first, second = ([counts for s, _, counts in report["steps"][n]["forwards"] if s == last] for report in reports)
        assert first and all(first), n
        assert second and not any(second), n


@pytest.mark.parametrize("stage", [2, 3])
def test_minibatches_with_uneven_rows_match_one_process(request, single, stage):
    launched = request.getfixturevalue(f"zero{stage}")
    reports = launched.run("minibatch")
    assert_own_rows_and_as_many_forwards(reports, steps_per_call=2)
    assert_second_process_idles_in_second_steps(reports)
    assert_same_steps(single, launched, "minibatch", stage=stage)


def test_zero2_shuffled_minibatches_agree_across_processes(zero2):
    """Each process shuffles its own rows: the mini-batches have no one-process equivalent, but
    every process runs the same optimizer steps, reports the same finite stats and ends with the
    same weights."""
    reports = zero2.run("minibatch-shuffled")
    assert_own_rows_and_as_many_forwards(reports, steps_per_call=2)
    assert_second_process_idles_in_second_steps(reports)  # 4 rows: one mini-batch step's worth
    for n in range(3):
        stats = [report["steps"][n]["stats"] for report in reports]
        assert stats[0] == stats[1], n
        assert stats[0]["rows"] == 9 and stats[0]["num_tokens"] == sum(r["steps"][n]["tokens"] for r in reports)
        assert math.isfinite(stats[0]["loss"]) and math.isfinite(stats[0]["grad_norm"]), n
    assert reports[0]["digest"] == reports[1]["digest"]
