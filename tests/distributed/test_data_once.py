"""Two processes on one machine: the data set is tokenized once (the main process first, the
other reads its cache), and each process builds only its own share of every step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("data_worker.py")
ROWS = [{"prompt": f"{a} {b}=", "completion": str(a * b)} for a in range(9) for b in range(7)]

pytest.importorskip("deepspeed", reason="two processes train under DeepSpeed")


def test_two_processes_tokenize_once_and_build_their_own_share(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out),
           str(data)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    missing = [r for r in range(2) if not (out / f"rank{r}.json").exists()]
    assert not missing, f"ranks {missing} did not finish (exit {done.returncode}):\n{done.stderr[-4000:]}"
    calls = [line for f in out.glob("calls-*.txt") for line in f.read_text().splitlines()]
    assert sorted(calls) == sorted(r["prompt"] for r in ROWS)  # every row tokenized once, over both processes
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0]["plan"] == ranks[1]["plan"] and ranks[0]["steps"] == ranks[1]["steps"]
    for step in ranks[0]["steps"]:  # gradient_accumulation_steps 1: one micro-batch each, rank order
        assert len(step) == 2
    built = [r["built"] for r in ranks]
    assert built[0] == [s[0] for s in ranks[0]["steps"]] and built[1] == [s[1] for s in ranks[0]["steps"]]
