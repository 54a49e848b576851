"""Forward+backward of the log-prob ops and the fused preference loss, every path side by side.

Time: pytest-benchmark, in this process. Peak extra memory: a fresh process per path
(benchmarks/memprobe.py), recorded in each result's extra_info.
"""

import pytest
import torch

from benchmarks import memprobe
from benchmarks.cases import PATHS, cases, make_inputs, runner, unavailable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARAMS = [(c, p) for c in cases(DEVICE) for p in PATHS[c.op]]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case,path", PARAMS, ids=[f"{c.label}-{p}" for c, p in PARAMS])
def test_logprobs(benchmark, case, path):
    reason = unavailable(path, DEVICE, case)
    if reason:
        pytest.skip(reason)
    benchmark.group = case.label
    benchmark.extra_info.update(
        op=case.op, n=case.n, h=case.h, v=case.v, dtype=case.dtype, path=path, device=DEVICE,
        peak_extra_bytes=memprobe.measure(case, path, DEVICE),
    )
    inputs = make_inputs(case, DEVICE)
    run = runner(case, path)

    def step():
        run(inputs)
        _sync()

    gpu = DEVICE == "cuda"
    benchmark.pedantic(step, rounds=10 if gpu else 3, warmup_rounds=2 if gpu else 0, iterations=1)
