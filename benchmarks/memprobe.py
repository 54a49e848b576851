"""Peak extra memory of one forward+backward, measured in a fresh process.

CPU: the process's resident-set high-water mark (VmHWM) after the run, minus its resident set
(VmRSS) once the inputs exist. That counts every byte the run touched on top of its inputs:
temporaries, the gradients it returns, allocator slack. CUDA: torch.cuda.max_memory_allocated
minus the memory allocated before the run.

    python -m benchmarks.memprobe OP N H V DTYPE PATH DEVICE   -> prints {"peak_extra_bytes": ...}
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from benchmarks.cases import Case, make_inputs, runner


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_here(case: Case, path: str, device: str) -> int:
    inputs = make_inputs(case, device)
    run = runner(case, path)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # Building the inputs peaks above their final size (an fp32 draw, scaled, then cast): reset the
    # high-water mark to the current resident set so that peak is not charged to the run.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    if _status_bytes("VmHWM") > base + (64 << 20):
        raise RuntimeError("could not reset the peak resident set (/proc/self/clear_refs)")
    run(inputs)
    return _status_bytes("VmHWM") - base


def measure(case: Case, path: str, device: str) -> int:
    """Peak extra bytes of ``path`` on ``case``, from a fresh interpreter."""
    args = [case.op, case.n, case.h, case.v, case.dtype, path, device]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memprobe", *map(str, args)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


if __name__ == "__main__":
    op, n, h, v, dtype, path, device = sys.argv[1:8]
    case = Case(op, int(n), int(h), int(v), dtype)
    print(json.dumps({"peak_extra_bytes": measure_here(case, path, device)}))
