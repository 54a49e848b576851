"""What a probe measures and prints, shared by the fastalign and the TRL probe (plain Python only)."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time


def rss_bytes() -> int:
    """The process's resident set now (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarise(system: str, algo: str, steps: list[dict], built_rss: int, train_seconds: float, extra: dict) -> dict:
    """Figures of one run from its per-step records (``seconds``, ``real_tokens``, ``tokens``,
    ``loss``, ``grad_norm``, ``cpu_seconds``); the first step is a warm-up, left out of the rates.
    CPU seconds per step (the process's, all threads) measure the work done, and vary less than the
    wall time when another process takes turns on the cores."""
    import torch

    timed = steps[1:] or steps
    real = sum(s["real_tokens"] for s in timed)
    seconds = sum(s["seconds"] for s in timed)
    return {
        "system": system, "algo": algo, "steps": len(steps), "timed_steps": len(timed),
        "tokens_per_s": real / seconds, "seconds_per_step": seconds / len(timed),
        "median_seconds_per_step": statistics.median(s["seconds"] for s in timed),
        "cpu_seconds_per_step": sum(s["cpu_seconds"] for s in timed) / len(timed),
        "real_tokens_per_step": real / len(timed),
        "pad_share": 1 - sum(s["real_tokens"] for s in steps) / max(1, sum(s["tokens"] for s in steps)),
        "peak_rss_bytes": peak_rss_bytes(), "built_rss_bytes": built_rss,
        # On CUDA, the memory that matters is the GPU's: the allocator's peak over the whole run.
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "train_seconds": train_seconds, "cpu_seconds": time.process_time(),
        "losses": [s["loss"] for s in steps], "grad_norms": [s["grad_norm"] for s in steps],
        "real_tokens": [s["real_tokens"] for s in steps],
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        **extra,
    }


def emit(figures: dict) -> None:
    print("RESULT " + json.dumps(figures), flush=True)
