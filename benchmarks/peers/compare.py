"""fastalign against TRL, end to end: DPO, reward modeling and SFT on the same pairs and weights.

    python -m benchmarks.peers [--profile cpu|gpu] [--rounds 3] [--algos dpo,reward,sft]
                               [--systems fastalign,trl,...] [--quick] [--chart PATH]
                               (from fastalign's venv; `make bench-peers`)

Runs every system in a fresh process (``fastalign_probe`` with this interpreter, ``trl_probe``
with the peer venv's), interleaved round by round (fastalign, TRL, fastalign with gradient
checkpointing, TRL with it, TRL with Liger's kernels, then again), so each system's peak RSS is its own and the load of the shared machine hits every
system alike. Per system and workload: medians over the rounds of real tokens/s and s/step, the
median peak RSS, the loss after the last step, and the ratios fastalign/peer from the runs of the
same round. Writes ``benchmarks/out/vs_trl/`` (``runs.jsonl`` with every run, ``vs_trl.md``)
and the chart (default ``benchmarks/out/vs_trl/vs_trl.png``). ``--quick``: 3 steps, 1 round.

``--profile gpu``: DPO with a Qwen2-0.5B-shaped model in bf16 (``workload.PROFILES``), on CUDA when
there is one; memory is then the GPU allocator's peak, and the output goes to
``benchmarks/out/vs_trl_gpu/``.

The peer venv (``benchmarks/out/venv-peers``, made by ``make bench-peers``; another with
``--peer-python``) holds TRL and liger-kernel; fastalign never depends on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from benchmarks.peers.workload import (
    ALGOS,
    BATCH,
    BETA,
    LEARNING_RATE,
    MAX_LENGTH,
    MAX_PROMPT_LENGTH,
    PROFILES,
    missing,
    prepare,
    steps_for,
)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "out" / "vs_trl"
OUT_GPU = ROOT / "benchmarks" / "out" / "vs_trl_gpu"
PEER_PYTHON = ROOT / "benchmarks" / "out" / "venv-peers" / "bin" / "python"
SYSTEMS = ("fastalign", "trl", "fastalign-ckpt", "trl-ckpt", "trl-liger")
LABELS = {"fastalign": "fastalign", "trl": "TRL", "fastalign-ckpt": "fastalign + checkpointing",
          "trl-ckpt": "TRL + checkpointing (its default)", "trl-liger": "TRL + Liger kernels"}
# (fastalign system, peer): same settings on both sides; the first is the headline comparison.
COMPARISONS = [("fastalign", "trl"), ("fastalign-ckpt", "trl-ckpt"), ("fastalign", "trl-ckpt"),
               ("fastalign", "trl-liger")]
TIMEOUT = 1800


def peer_python(path: str | None = None) -> Path | None:
    candidate = Path(path or os.environ.get("FASTALIGN_PEER_PYTHON") or PEER_PYTHON)
    return candidate if candidate.exists() else None


def peer_versions(python: Path) -> dict:
    code = ("import json, trl, transformers, torch, datasets, accelerate\n"
            "try:\n import liger_kernel; from importlib.metadata import version; lk = version('liger-kernel')\n"
            "except Exception: lk = None\n"
            "print(json.dumps({'trl': trl.__version__, 'transformers': transformers.__version__, "
            "'torch': torch.__version__, 'datasets': datasets.__version__, 'accelerate': accelerate.__version__, "
            "'liger_kernel': lk}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_probe(system: str, algo: str, prep: Path, steps: int, python: Path, run_dir: Path) -> dict:
    if system.startswith("fastalign"):
        cmd = [sys.executable, "-m", "benchmarks.peers.fastalign_probe", system, algo, str(prep), str(run_dir),
               str(steps)]
    else:
        cmd = [str(python), "-m", "benchmarks.peers.trl_probe", system, algo, str(prep), str(run_dir), str(steps)]
    path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), PYTHONPATH=path,
               TOKENIZERS_PARALLELISM="false")
    load = os.getloadavg()[0]
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"system": system, "algo": algo, "error": f"timed out after {TIMEOUT} s"}
    wall = time.perf_counter() - began
    shutil.rmtree(run_dir, ignore_errors=True)  # the saved model and logs: the figures are in stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        return {"system": system, "algo": algo, "error": (errors[-1] if errors else proc.stderr[-500:]).strip(),
                "returncode": proc.returncode}
    figures = json.loads(lines[-1][len("RESULT "):])
    figures.update(process_seconds=wall, load_before=load, load_after=os.getloadavg()[0])
    return figures


# ---- aggregation ------------------------------------------------------------------------------------
def aggregate(runs: list[dict]) -> dict:
    """{algo: {"systems": {system: medians}, "ratios": {(mine, peer): per-round ratios}}}."""
    out: dict = {}
    for algo in ALGOS:
        mine = [r for r in runs if r["algo"] == algo]
        if not mine:
            continue
        systems, ratios = {}, {}
        for system in SYSTEMS:
            ok = [r for r in mine if r["system"] == system and "error" not in r]
            failed = [r for r in mine if r["system"] == system and "error" in r]
            if not ok:
                if failed:
                    systems[system] = {"error": failed[0]["error"]}
                continue
            def med(key, ok=ok):
                return statistics.median(r[key] for r in ok)

            systems[system] = {
                "runs": len(ok), "tokens_per_s": med("tokens_per_s"), "seconds_per_step": med("seconds_per_step"),
                "peak_gpu_bytes": med("peak_gpu_bytes") if ok[0].get("peak_gpu_bytes") else None,
                "cpu_seconds_per_step": med("cpu_seconds_per_step"),
                "peak_rss_bytes": med("peak_rss_bytes"), "built_rss_bytes": med("built_rss_bytes"),
                "real_tokens_per_step": med("real_tokens_per_step"), "pad_share": med("pad_share"),
                "final_loss": ok[0]["losses"][-1], "losses": ok[0]["losses"], "grad_norms": ok[0]["grad_norms"],
                "loss_spread": max(r["losses"][-1] for r in ok) - min(r["losses"][-1] for r in ok),
                "steps": ok[0]["steps"], "data_digest": ok[0]["data_digest"], "attention": ok[0]["attention"],
                "parameters": ok[0]["parameters"], "tokens_per_s_all": [r["tokens_per_s"] for r in ok],
                "load": [r["load_before"] for r in ok],
            }
        for a, b in COMPARISONS:
            pairs = []
            for x in (r for r in mine if r["system"] == a and "error" not in r):
                y = [r for r in mine if r["system"] == b and r.get("round") == x["round"] and "error" not in r]
                if y:  # the peer's run of the same round
                    pairs.append((x, y[0]))
            if pairs:
                ratios[f"{a}/{b}"] = {
                    "speedup": [x["tokens_per_s"] / y["tokens_per_s"] for x, y in pairs],
                    "cpu_speedup": [(y["cpu_seconds_per_step"] / y["real_tokens_per_step"])
                                    / (x["cpu_seconds_per_step"] / x["real_tokens_per_step"]) for x, y in pairs],
                    "memory": [_memory(x) / _memory(y) for x, y in pairs],
                }
        out[algo] = {"systems": systems, "ratios": ratios}
    return out


def _memory(run: dict) -> int:
    """The peak memory that bounds a run: the GPU allocator's on CUDA, the resident set on the CPU."""
    return run.get("peak_gpu_bytes") or run["peak_rss_bytes"]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


TARGETS = {"dpo": (2.0, 0.6), "reward": (1.5, None), "sft": (1.5, None)}
NAMES = {"dpo": "DPO", "reward": "reward", "sft": "SFT"}


def _verdict(algo: str, speed: float, memory: float) -> str:
    t_speed, t_mem = TARGETS[algo]
    ok = speed >= t_speed and (t_mem is None or memory <= t_mem)
    return f">= {t_speed}x" + (f" at <= {t_mem}x memory" if t_mem else "") + (": **met**" if ok else ": short")


def _model_line(profile: dict) -> str:
    m = profile["model"]
    return (f"{profile['label']} {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
            f"{m['num_attention_heads']} heads ({m['num_key_value_heads']} KV), intermediate {m['intermediate_size']}, "
            f"vocabulary {m['vocab_size']}, {'bf16 autocast' if profile['bf16'] else 'fp32'}")


def table(summary: dict, meta: dict) -> str:
    med = statistics.median
    profile = PROFILES[meta["profile"]]
    gpu = meta.get("device", "cpu") != "cpu"
    memory = "peak GPU memory GiB (peak RSS)" if gpu else "peak RSS GiB (built trainer)"
    lines = [
        f"{meta['date']} · {meta['machine']} · load average {meta['load'][0]:.1f} at the start, "
        f"{meta['load'][1]:.1f} at the end · fastalign: torch {meta['torch']}, transformers "
        f"{meta['transformers']} · peers: trl {meta['peers'].get('trl')}, transformers "
        f"{meta['peers'].get('transformers')}, torch {meta['peers'].get('torch')}, liger-kernel "
        f"{meta['peers'].get('liger_kernel')} · Python {meta['python']}",
        "",
        f"{meta.get('device', 'cpu')} · {_model_line(profile)} (a byte-level BPE tokenizer); "
        f"max_length {MAX_LENGTH}, max_prompt_length {MAX_PROMPT_LENGTH}; {BATCH['dpo']} pairs (DPO, reward) or "
        f"{BATCH['sft']} sequences (SFT) per optimizer step, in file order; AdamW, lr "
        + ", ".join(f"{a} {LEARNING_RATE[a]:g}" for a in ALGOS)
        + f", linear decay, no warm-up, clip 1.0; DPO sigmoid, beta {BETA}, frozen reference. "
        f"Medians of {meta['rounds']} interleaved rounds; rates over steps 2 to N.",
        "",
        f"| workload | system | real tokens/s | s/step | CPU s/step | {memory} | pad share | loss after N steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algo, per in summary.items():
        for system, s in per["systems"].items():
            if "error" in s:
                lines.append(f"| {NAMES[algo]} | {LABELS[system]} | did not run: `{s['error'][:120]}` | | | | | |")
                continue
            lines.append(
                f"| {NAMES[algo]} | {LABELS[system]} | {s['tokens_per_s']:.0f} | {s['seconds_per_step']:.2f} | "
                f"{s['cpu_seconds_per_step']:.2f} | "
                + (f"{_gib(s['peak_gpu_bytes'])} ({_gib(s['peak_rss_bytes'])})" if gpu else
                   f"{_gib(s['peak_rss_bytes'])} ({_gib(s['built_rss_bytes'])})") + " | "
                f"{s['pad_share']:.0%} | {s['final_loss']:.4f} (N={s['steps']}) |"
            )
    lines += [
        "", "Ratios, fastalign over the peer, from the runs of the same round (median, then each round):", "",
        f"| workload | fastalign vs | real tokens/s | real tokens per CPU second | "
        f"{'peak GPU memory' if gpu else 'peak RSS'} | target |",
        "|---|---|---|---|---|---|",
    ]

    def each(xs):
        return ", ".join(f"{x:.2f}" for x in xs)

    for algo, per in summary.items():
        for key, r in per["ratios"].items():
            a, b = key.split("/")
            lines.append(
                f"| {NAMES[algo]} | {LABELS[a]} vs {LABELS[b]} | **{med(r['speedup']):.2f}x** ({each(r['speedup'])}) | "
                f"{med(r['cpu_speedup']):.2f}x ({each(r['cpu_speedup'])}) | **{med(r['memory']):.2f}x** "
                f"({each(r['memory'])}) | {_verdict(algo, med(r['speedup']), med(r['memory']))} |"
            )
    lines += ["", "Loss per step (first round of each system) and gradient norm at step 1:", ""]
    for algo, per in summary.items():
        for system, s in per["systems"].items():
            if "error" not in s:
                lines.append(f"- {NAMES[algo]}, {LABELS[system]}: " + ", ".join(f"{x:.4f}" for x in s["losses"])
                             + " · grad norm " + (f"{s['grad_norms'][0]:.4f}" if s["grad_norms"][0] else "-"))
    return "\n".join(lines) + "\n"


def chart(summary: dict, path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(summary)
    def ran(a, s):
        return "error" not in summary[a]["systems"].get(s, {"error": ""})

    systems = [s for s in SYSTEMS if any(ran(a, s) for a in algos)]
    colors = {"fastalign": "#1f77b4", "fastalign-ckpt": "#9ecae1", "trl": "#ff7f0e", "trl-ckpt": "#fdae6b",
              "trl-liger": "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    width = 0.8 / max(1, len(systems))
    for k, system in enumerate(systems):
        xs = [i + (k - (len(systems) - 1) / 2) * width for i in range(len(algos))]
        got = [summary[a]["systems"].get(system, {}) for a in algos]
        tps = [g.get("tokens_per_s", 0) for g in got]
        rss = [_memory(g) / 2**30 if g else 0 for g in got]
        for ax, values, fmt in ((axes[0], tps, "{:.0f}"), (axes[1], rss, "{:.1f}")):
            bars = ax.bar(xs, values, width, label=LABELS[system], color=colors[system])
            for bar, v in zip(bars, values):
                if v:
                    ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=7)
    on_gpu = meta.get("device", "cpu") != "cpu"
    for ax, title in ((axes[0], "real (non-pad) tokens/s, higher is better"),
                      (axes[1], f"peak {'GPU' if on_gpu else 'resident'} memory, GiB, lower is better")):
        ax.set_xticks(range(len(algos)), [NAMES[a] for a in algos])
        ax.set_title(title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(fontsize=8, frameon=False)
    failed = sorted({LABELS[s] for a in algos for s, v in summary[a]["systems"].items() if "error" in v})
    if failed:
        why = "" if on_gpu else " (Triton kernels need a GPU)"
        fig.text(0.5, 0.01, f"did not run on this {'GPU' if on_gpu else 'CPU'}: " + "; ".join(failed) + why,
                 ha="center", fontsize=8, style="italic")
    params = next((v["parameters"] for a in algos if a != "reward" for v in summary[a]["systems"].values()
                   if "parameters" in v), 0)
    profile, device = PROFILES[meta["profile"]], meta.get("device", "cpu")
    where = device if device != "cpu" else f"CPU ({meta['machine'].split(',')[1].strip()})"
    model = profile["model"]
    fig.suptitle(f"fastalign vs TRL {meta['peers'].get('trl')}: {profile['label']} {model['num_hidden_layers']}x"
                 f"{model['hidden_size']} ({params / 1e6:.0f}M), HH-RLHF pairs, {BATCH['dpo']} per step, "
                 f"{'bf16' if profile['bf16'] else 'fp32'}, {where}, medians of {meta['rounds']} rounds, "
                 f"{meta['date'][:10]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 if failed else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--algos", default=None, help="default: the profile's (cpu: dpo,reward,sft; gpu: dpo)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the workload's)")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 round")
    parser.add_argument("--peer-python", default=None)
    parser.add_argument("--chart", default=None, help="default: vs_trl.png in the output folder")
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        print(f"skipped: {reason}")
        return 0
    out = OUT_GPU if args.profile == "gpu" else OUT
    chart_path = Path(args.chart) if args.chart else out / "vs_trl.png"
    algos = [a for a in (args.algos or ",".join(PROFILES[args.profile]["algos"])).split(",") if a]
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS) | set(algos) - set(PROFILES[args.profile]["algos"])
    if unknown:
        parser.error(f"unknown {sorted(unknown)}")
    python = peer_python(args.peer_python)
    if python is None and any(not s.startswith("fastalign") for s in systems):
        print(f"skipped: no peer venv at {PEER_PYTHON} (make bench-peers creates it; or pass --peer-python)")
        return 0
    rounds = 1 if args.quick else args.rounds
    steps = {a: args.steps or steps_for(a, args.quick) for a in algos}
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(out / "prep", max(steps.values()), args.profile)
    import torch
    import transformers

    meta = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), "rounds": rounds, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peers": peer_versions(python) if python else {}, "load": [os.getloadavg()[0]], "profile": args.profile,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    runs, failed = [], set()
    with open(out / "runs.jsonl", "a") as log:
        for algo in algos:
            for r in range(rounds):
                for system in systems:
                    if (algo, system) in failed:  # a system that failed is not retried in later rounds
                        continue
                    run_dir = out / "runs" / f"{algo}-{system}-{r}"
                    figures = run_probe(system, algo, prep, steps[algo], python, run_dir)
                    figures.update(round=r, date=meta["date"])
                    runs.append(figures)
                    log.write(json.dumps(figures) + "\n")
                    log.flush()
                    if "error" in figures:
                        failed.add((algo, system))
                        print(f"{algo} {system} round {r}: did not run: {figures['error']}", flush=True)
                    else:
                        print(f"{algo} {system} round {r}: {figures['tokens_per_s']:.0f} tokens/s, "
                              f"{figures['seconds_per_step']:.2f} s/step ({figures['cpu_seconds_per_step']:.2f} CPU), "
                              f"peak memory {_gib(_memory(figures))} GiB, loss {figures['losses'][-1]:.4f} "
                              f"(load {figures['load_before']:.1f})", flush=True)
    meta["load"].append(os.getloadavg()[0])
    summary = aggregate(runs)
    for algo, per in summary.items():  # every system trained on the same token ids
        digests = {s["data_digest"] for s in per["systems"].values() if "error" not in s}
        if len(digests) > 1:
            print(f"warning: {algo}: the systems trained on different token ids {digests}")
    text = table(summary, meta)
    (out / "vs_trl.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    chart(summary, chart_path, meta)
    print("\n" + text)
    print(f"chart: {chart_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
