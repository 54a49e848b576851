"""Run every kernel benchmark and print a table: `python -m benchmarks [pytest args]`.

Writes the raw pytest-benchmark JSON and a Markdown table to benchmarks/out/. On a GPU the table
adds the fraction of the device's physical limit: memory bandwidth for selective_logprobs (bytes
that must move: read the logits twice, write their gradient once), matmul throughput for
linear_logprobs (the three lm_head matmuls, 6*N*H*V flops).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

OUT = Path(__file__).parent / "out"
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Dense peaks from the vendors' data sheets: (memory bandwidth B/s, {dtype: matmul flop/s}).
PEAKS = {
    "H100": (3.35e12, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    "H200": (4.8e12, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    "A100": (2.0e12, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def physical_fraction(info: dict, seconds: float) -> str:
    if info["device"] != "cuda":
        return ""
    name = torch.cuda.get_device_name()
    peak = next((p for k, p in PEAKS.items() if k in name), None)
    if peak is None:
        return "?"
    if info["op"] == "selective_logprobs":
        moved = 3 * info["n"] * info["v"] * BYTES[info["dtype"]]
        return f"{moved / seconds / peak[0]:.0%} of HBM"
    if info["op"] == "linear_logprobs":
        flops = 6 * info["n"] * info["h"] * info["v"]
        return f"{flops / seconds / peak[1][info['dtype']]:.0%} of matmul peak"
    return ""  # no single physical limit stated for the other ops


def table(results: dict) -> str:
    rows = [
        f"{date.today()} · {machine()} · torch {torch.__version__} · python {platform.python_version()}",
        "",
        "| op | shape | dtype | path | median time | peak extra memory | vs naive (time, memory) | physical limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    benches = results["benchmarks"]
    naive = {b["group"]: b for b in benches if b["extra_info"]["path"] == "naive"}
    for b in benches:
        info, median = b["extra_info"], b["stats"]["median"]
        shape = f"N={info['n']} H={info['h']} V={info['v']}" if info["h"] else f"N={info['n']} V={info['v']}"
        ref = naive.get(b["group"])
        ratio = ""
        if ref:
            ratio = f"{median / ref['stats']['median']:.2f}x, {info['peak_extra_bytes'] / ref['extra_info']['peak_extra_bytes']:.0%}"
        rows.append(
            f"| {info['op']} | {shape} | {info['dtype']} | {info['path']} | {median:.3f} s | "
            f"{info['peak_extra_bytes'] / 2**30:.2f} GiB | {ratio} | {physical_fraction(info, median)} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    OUT.mkdir(exist_ok=True)
    raw = OUT / "latest.json"
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).parent), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={raw}", "--benchmark-columns=min,median,max,rounds", *argv]
    code = subprocess.call(cmd)
    if code != 0 or not raw.exists():
        return code
    text = table(json.loads(raw.read_text()))
    (OUT / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
