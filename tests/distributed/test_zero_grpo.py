"""DeepSpeed ZeRO on 2 CPU processes (gloo): GRPO's steps match one process.

Three launches of ``grpo_worker.py`` (``torchrun --standalone``): one plain process, two under
ZeRO-2 and two under ZeRO-3 (tiny parameters sharded: ``stage3_param_persistence_threshold`` 0).
Each trains 4 steps on the same rollouts (a stand-in generator draws each prompt's group from the
prompt alone; each of 2 processes takes one of the 2 prompts of a generation), with the KL term
(a reference model, sharded under ZeRO-3) and 2 iterations per generation (old log-probs). Every
logged metric (the rewards and advantages' groups gathered over processes, the clip ratios, KL
and entropy reduced over them, the loss, the gradient norm) and the saved weights must match.
The ZeRO launches then train 2 steps with the model's own sampling (under ZeRO-3 the policy
gathered once per generation): they must run. A process may abort during gloo's teardown after
its work is done, so success is judged from the files each process wrote.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("grpo_worker.py")
ZERO2 = {"stage": 2}
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
TOL = 1e-4

pytest.importorskip("deepspeed", reason="needs deepspeed")


def launch(out: Path, config, nproc: int) -> list[dict]:
    """Every process's reports; each run must have finished on every process."""
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           str(out), json.dumps(config) if config else "none"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    paths = [out / f"rank{r}.json" for r in range(nproc)]
    ranks = [json.loads(p.read_text()) if p.exists() else {} for p in paths]
    for rank, reports in enumerate(ranks):
        for name in ("fixed",) + (("sampled",) if nproc > 1 else ()):
            assert reports.get(name, {}).get("done"), (f"{name}: rank {rank} did not finish:\n"
                                                       f"{reports.get(name, {}).get('error', '')}\n{done.stderr[-3000:]}")
    return ranks


def test_grpo_under_zero2_and_zero3_equals_one_process(tmp_path):
    (single,) = launch(tmp_path / "single", None, 1)
    want = single["fixed"]["steps"]
    assert len(want) == 4 and single["fixed"]["stage"] is None
    assert all(r["kl"] > 0 for r in want[1:]) and len({round(r["reward"], 6) for r in want if "reward" in r}) == 2
    weights = load_file(tmp_path / "single" / "fixed" / "model.safetensors")
    worst = {}
    for name, config, stage in (("zero2", ZERO2, 2), ("zero3", ZERO3, 3)):
        ranks = launch(tmp_path / name, config, 2)
        for report in ranks:
            got = report["fixed"]
            assert got["stage"] == stage and got["world"] == 2 and len(got["steps"]) == 4
            if stage == 3:  # the policy and the reference are each held about half on each process
                for key in ("held", "ref_held"):
                    assert 0.45 <= got[key][0] / got[key][1] <= 0.55, (key, got[key])
            for n, (a, b) in enumerate(zip(want, got["steps"])):
                assert a.keys() == b.keys(), n
                for key, value in a.items():
                    assert b[key] == pytest.approx(value, abs=TOL, rel=TOL), (name, n, key)
                    worst[name] = max(worst.get(name, 0.0), abs(b[key] - value))
            sampled = report["sampled"]
            assert sampled["steps"] == 2 and sampled["lengths"] > 0 and sampled["loss"] == sampled["loss"]
        saved = load_file(tmp_path / name / "fixed" / "model.safetensors")
        assert saved.keys() == weights.keys()
        diff = max(float((saved[k] - weights[k]).abs().max()) for k in weights)
        assert diff < TOL, (name, diff)
        worst[f"{name} weights"] = diff
    print(f"\nlargest differences from one process: {worst}")
