"""Every Triton kernel, at every launch the wrappers plan for realistic shapes, compiles for the GPU.

No GPU needed: ``fastalign.kernels.aot`` compiles each distinct specialisation once per target
(sm_80, sm_90, and sm_100 where this Triton has it) in a subprocess without the interpreter, and
reads registers, spills and load widths from the cubin and its SASS. The launch grids are checked
here directly, from the wrappers' own planning functions, for a 132-SM part.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastalign.kernels import aot, gae, segments
from fastalign.kernels.linear_logprobs import chunk_plan

SMS = aot.SMS


@pytest.fixture(scope="session")
def report(tmp_path_factory):
    """The compile report, made once per session (each distinct compilation once)."""
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "fastalign.kernels.aot", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_targets(report):
    assert {80, 90} <= set(report["archs"])
    if 100 not in report["archs"]:
        pytest.skip(report["skipped"].get("sm_100", "sm_100 not compiled"))


def test_no_spills_no_local_memory(report):
    bad = [f"{r['name']} sm_{r['arch']}: stack {r['stack']}, local {r['local']}, LDL/STL {r['spill_instructions']}"
           for r in report["launches"] if r["stack"] or r["local"] or r["spill_instructions"]]
    assert not bad, "\n".join(bad)
    assert all(0 < r["registers"] <= 255 for r in report["launches"])


def test_hot_loops_load_128_bits(report):
    """Where rows are contiguous and 16-byte aligned, the hot loop's loads are all 128-bit."""
    bad = []
    for r in report["launches"]:
        if not r["vectorised"]:
            continue
        if r["ptx_v4_loads"] == 0 or r["hot_loop_ldg128"] == 0:
            bad.append(f"{r['name']} sm_{r['arch']}: ld.global.v4 {r['ptx_v4_loads']}, LDG.E.128 in loop {r['hot_loop_ldg128']}")
        elif r["kernel"] in ("_row_stats_kernel", "_row_grad_kernel", "_full_kl_kernel", "_full_kl_grad_kernel",
                             "_segment_sum_kernel") and r["hot_loop_ldg128"] != r["hot_loop_loads"]:
            bad.append(f"{r['name']} sm_{r['arch']}: {r['hot_loop_loads'] - r['hot_loop_ldg128']} narrower loads in the loop")
    assert not bad, "\n".join(bad)


def test_row_stats_loop_is_lean(report):
    """bf16 row statistics, 4096-wide tiles: base-2 exponentials with a hoisted 1/T (267 before)."""
    loops = {r["hot_loop_instructions"] for r in report["launches"]
             if r["name"].startswith("row_stats selective") and "bf16" in r["name"] and r["arch"] == 90}
    assert loops and max(loops) <= 180, loops


# ----------------------------------------------------------------------------------------------
# Grids, straight from the wrappers' planning functions (no compile, no launch).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", aot.VOCABS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [8192, 16384])
def test_linear_logprobs_grids_fill_the_gpu(n, dtype, vocab):
    plan = chunk_plan(n, vocab, dtype, torch.device("cuda"), "triton", sms=SMS)
    assert plan.rows >= 2 * SMS, plan.reason  # one row-kernel program per chunk row
    assert plan.logits_dtype == dtype, plan.reason  # no fp32 copy of the logits
    assert plan.cols % 128 == 0 or plan.cols == vocab, plan.reason
    assert plan.cols == vocab or plan.cols % 4096 == 0, plan.reason  # whole row-kernel tiles
    cpu = chunk_plan(n, vocab, dtype, torch.device("cpu"), "torch")
    assert cpu.rows < plan.rows and cpu.logits_dtype == torch.float32 and cpu.cols % 128 == 0, cpu.reason


def test_every_planned_launch_has_two_programs_per_sm_at_8k(report):
    """Row kernels: one program per row; GAE and segment sums split small batches."""
    for r in report["launches"]:
        if r["kernel"] in ("_row_stats_kernel", "_row_grad_kernel", "_full_kl_kernel", "_full_kl_grad_kernel"):
            assert r["programs"] >= 2 * SMS, r["name"]


@pytest.mark.parametrize("B,T", [(64, 128), (64, 1024), (8, 1024), (128, 512), (512, 512), (4096, 2)])
def test_gae_grid(B, T):
    plan = gae._gae_plan(B, T, SMS)
    programs = -(-B // plan["BLOCK_B"]) * plan["n_seg"]
    if B * T >= 8192:
        assert programs >= 2 * SMS, plan
    assert plan["seg_len"] % plan["BLOCK_T"] == 0 and plan["n_seg"] * plan["seg_len"] >= T


@pytest.mark.parametrize("n,s", [(8192, 16), (16384, 64), (65536, 8), (8192, 4096)])
def test_segment_sum_grid(n, s):
    """2 programs per SM, or one per block of tokens when there are fewer blocks than that."""
    programs = s * segments.segment_parts(n, s, SMS)
    assert programs >= min(2 * SMS, n // segments.BLOCK)
