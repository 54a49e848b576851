"""Every kernel, as the wrappers launch it on a GPU, compiled ahead of time: no GPU needed.

    python -m fastalign.kernels.aot [--json FILE] [--arch 80,90,100]

enumerates the launches the wrappers plan at realistic shapes (vocabularies of 32000, 128256 and
152064; up to 16k tokens; bf16, fp16 and fp32; a 132-SM device), through their own ``*_launch``
functions called on ``meta`` tensors, and compiles each distinct specialisation once per target
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, deriving signature,
constants and alignment attributes exactly as a launch would (Triton's own binder). For each it
reads from the cubin (``cuobjdump -res-usage``) and its SASS (``nvdisasm``): registers, stack and
local memory, spill instructions (``LDL``/``STL``), 128-bit loads, and the size of the hot loop.

It must run without ``TRITON_INTERPRET`` (kernels decorated for compiling, not interpreting);
``tests/kernels/test_compile_gpu.py`` runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton

from . import gae, kl, logprobs, segments
from ._launch import Launch
from .linear_logprobs import chunk_plan
from .logprobs import RowOptions

SMS = 132  # an H100/H200
VOCABS = (32000, 128256, 152064)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def row_launches() -> list[tuple[str, Launch, bool]]:
    """(name, launch, vectorised) for the row kernels, as selective_logprobs, entropy_from_logits,
    linear_logprobs (forward chunks, backward tiles) and the fused preference loss plan them."""
    opts = RowOptions(backend="triton")
    out = []
    for v in VOCABS:
        for dname, dt in DTYPES.items():
            # selective_logprobs / entropy on [B, T, V] logits (i32 and i64 batch strides).
            for b, t in ((8, 2048), (1, 16384)):
                x3 = _meta(b, t, v, dtype=dt)
                y, f1, f2 = _meta(b, t, dtype=torch.long), _meta(b, t), _meta(b, t, 2)
                tag = f"V={v} {dname} [{b},{t}]"
                out.append((f"row_stats selective {tag}", logprobs.row_stats_launch(x3, y, f1, f2, None, opts), True))
                out.append((f"row_grad selective {tag}", logprobs.row_grad_launch(x3, x3, y, f2, None, f1, None, opts), True))
                out.append((f"row_stats entropy {tag}", logprobs.row_stats_launch(x3, None, None, f2, f1, opts), True))
                out.append((f"row_grad entropy {tag}", logprobs.row_grad_launch(x3, x3, None, f2, f1, None, f1, opts), True))
            # linear_logprobs on CUDA at 16k tokens: forward chunks, backward vocabulary tiles.
            n = 16384
            plan = chunk_plan(n, v, dt, torch.device("cuda"), "triton", sms=SMS)
            xc = _meta(1, plan.rows, v, dtype=plan.logits_dtype)
            y, f1, f2 = _meta(1, plan.rows, dtype=torch.long), _meta(1, plan.rows), _meta(1, plan.rows, 2)
            tag = f"V={v} {dname} N={n}"
            out.append((f"row_stats linear {tag}", logprobs.row_stats_launch(xc, y, f1, f2, f1, opts), True))
            xt = _meta(1, n, plan.cols, dtype=plan.logits_dtype)
            y, f1, f2 = _meta(1, n, dtype=torch.long), _meta(1, n), _meta(1, n, 2)
            out.append((f"row_grad linear tile {tag}", logprobs.row_grad_launch(xt, xt, y, f2, f1, f1, f1, opts, col0=plan.cols), True))
        # full KL (PPO's kl_penalty="full") on [B, T, V], bf16 and fp32.
        for dname in ("bf16", "fp32"):
            x3 = _meta(8, 2048, v, dtype=DTYPES[dname])
            f1, f4 = _meta(8, 2048), _meta(8, 2048, 4)
            out.append((f"full_kl V={v} {dname}", kl.full_kl_launch(x3, x3, f4, f1), True))
            out.append((f"full_kl_grad V={v} {dname}", kl.full_kl_grad_launch(x3, x3, x3, x3, f4, f1, f1), True))
    return out


def scan_launches() -> list[tuple[str, Launch, bool]]:
    """(name, launch, vectorised) for GAE and the segment sums at small and large batches."""
    out = []
    for b, t in ((64, 1024), (512, 512), (8, 128)):
        for dname in ("fp32", "bf16"):
            v = _meta(b, t, dtype=DTYPES[dname])
            for m in (None, _meta(b, t)):
                plan = gae._gae_plan(b, t, SMS)
                heads = _meta(b, plan["n_seg"]) if plan["n_seg"] > 1 else None
                for launch in gae.gae_launches(v, v, m, _meta(b, t), heads, 1.0, 0.95, SMS):
                    tag = f"B={b} T={t} {dname}{' mask' if m is not None else ''} pass {launch.constexprs['PASS']}"
                    # Only the first load of each tile is contiguous AND aligned; the next step's
                    # value is one element on: 128-bit loads for fp32 data (8 bf16 are too few) when
                    # each thread holds 4 elements of a tile.
                    big = launch.constexprs["BLOCK_B"] * launch.constexprs["BLOCK_T"] >= 128 * launch.num_warps
                    out.append((f"gae {tag}", launch, dname == "fp32" and big))
    for n, s in ((16384, 64), (8192, 16), (65536, 8)):
        for dname in ("fp32", "bf16"):
            parts = segments.segment_parts(n, s, SMS)
            launch = segments.segment_sum_launch(_meta(n, dtype=DTYPES[dname]), _meta(s + 1, dtype=torch.int32), _meta(s, parts))
            out.append((f"segment_sum N={n} S={s} {dname}", launch, dname == "fp32"))
    return out


def all_launches() -> list[tuple[str, Launch, bool]]:
    """(name, launch, vectorised) for every kernel launch the wrappers make."""
    return row_launches() + scan_launches()


def supported_archs() -> dict[int, str | None]:
    """Each target arch and why it is skipped (None: compiles here)."""
    from triton.backends.nvidia.compiler import CUDABackend

    out = {80: None, 90: None}
    try:
        CUDABackend(triton.backends.compiler.GPUTarget("cuda", 100, 32)).parse_options({})
        out[100] = None if (TOOLS / "ptxas-blackwell").exists() or (TOOLS / "ptxas").exists() else "no ptxas for sm_100"
    except Exception as e:  # noqa: BLE001 - any refusal means: not supported by this Triton
        out[100] = f"this Triton ({triton.__version__}) does not target sm_100: {e}"
    return out


# ----------------------------------------------------------------------------------------------
# Compiling one launch, and reading the result.
# ----------------------------------------------------------------------------------------------


def _source(launch, arch):
    """(ASTSource, options) as a launch with these arguments would compile them for ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.constexprs, "num_warps": launch.num_warps}
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return target, ASTSource(fn, signature, constexprs, attrs), options


def key(launch: Launch, arch: int) -> str:
    """One string per distinct compilation (what Triton's own cache would key on)."""
    _, src, options = _source(launch, arch)
    return f"sm{arch}-{launch.kernel.__name__}-{src.hash()}-{sorted(options.__dict__.items())}"


def _loops(sass: str):
    """(instructions, lines) of each loop in ``sass``: a backward branch to a label."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line.strip()))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA(?:\.\w+)*\s.*?`\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if re.match(r"^\s*/\*[0-9a-f]{4,}\*/", x)]
            loops.append(body)
    return loops


def inspect(launch: Launch, arch: int) -> dict:
    """Compile ``launch`` for sm_``arch`` and read its resources, loads and hot loop."""
    target, src, options = _source(launch, arch)
    ck = triton.compile(src, target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        res = subprocess.run([TOOLS / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([TOOLS / "nvdisasm", "-c", cubin], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    loops = _loops(sass)
    hot = max(loops, key=len) if loops else []
    ptx = ck.asm["ptx"]
    return {
        "kernel": launch.kernel.__name__,
        "arch": arch,
        "registers": int(usage.get("REG", -1)),
        "stack": int(usage.get("STACK", -1)),
        "local": int(usage.get("LOCAL", -1)),
        "shared": int(usage.get("SHARED", -1)),
        "spill_instructions": len(re.findall(r"\b(LDL|STL)\b", sass)),
        "ptx_v4_loads": len(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.v4", ptx)),
        "ldg128": len(re.findall(r"LDG\.E\.128", sass)),
        "hot_loop_instructions": len(hot),
        "hot_loop_ldg128": sum("LDG.E.128" in x for x in hot),
        "hot_loop_loads": sum("LDG" in x for x in hot),
        "num_warps": launch.num_warps,
    }


def _inspect_job(job):
    name, arch = job
    launch, _ = _BY_NAME[name]
    return name, arch, inspect(launch, arch)


_BY_NAME: dict = {}


def report(archs: list[int] | None = None, workers: int | None = None) -> dict:
    """Compile every distinct launch once per arch; returns {"archs", "skipped", "launches"}."""
    support = supported_archs()
    archs = [a for a in (archs or support) if support.get(a) is None]
    launches = all_launches()
    _BY_NAME.update({name: (launch, vec) for name, launch, vec in launches})
    first = {}  # compile key -> first launch name with it
    alias = {}
    for name, launch, _ in launches:
        for arch in archs:
            k = key(launch, arch)
            alias[(name, arch)] = first.setdefault(k, (name, arch))
    jobs = sorted(set(alias.values()))
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    with ProcessPoolExecutor(workers) as pool:
        done = {(n, a): r for n, a, r in pool.map(_inspect_job, jobs)}
    rows = []
    for name, launch, vec in launches:
        for arch in archs:
            rows.append({"name": name, "programs": launch.programs, "vectorised": vec, **done[alias[(name, arch)]]})
    skipped = {f"sm_{a}": why for a, why in support.items() if why}
    return {"archs": archs, "skipped": skipped, "compiled": len(jobs), "launches": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--arch", help="comma-separated archs (default: 80, 90 and 100 where supported)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("fastalign.kernels.aot compiles kernels: unset TRITON_INTERPRET")
    rep = report([int(a) for a in args.arch.split(",")] if args.arch else None)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
    seen = set()
    print(f"{rep['compiled']} compilations for sm_{', sm_'.join(map(str, rep['archs']))}; skipped: {rep['skipped'] or 'none'}")
    print(f"{'kernel / launch':60} {'arch':>4} {'regs':>4} {'stack':>5} {'spill':>5} {'ldg128':>6} {'loop':>5} {'programs':>8}")
    for r in rep["launches"]:
        if (r["kernel"], r["arch"], r["registers"], r["hot_loop_instructions"]) in seen:
            continue
        seen.add((r["kernel"], r["arch"], r["registers"], r["hot_loop_instructions"]))
        print(f"{r['name'][:60]:60} {r['arch']:>4} {r['registers']:>4} {r['stack']:>5} {r['spill_instructions']:>5} "
              f"{r['ldg128']:>6} {r['hot_loop_instructions']:>5} {r['programs']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
