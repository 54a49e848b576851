"""The bad-input battery (issue 19): about 200 mistakes a new user makes, run through the
``fastalign`` command as subprocesses, each in its own folder, and classified.

    python -m benchmarks.battery [--out FILE] [--jobs N] [-k SUBSTRING] [--list]

Each case is a command (``fastalign train ALGO --config cfg.yaml --key value ...``) on the built-in
tiny model, 1-6 steps, small token budgets, with the files it needs (data, configs, checkpoints),
or a flow of several commands (a run killed with SIGKILL at a random moment and resumed, a
checkpoint corrupted and resumed, an output folder reused). A result is one of

- ``GOOD``: a mistake refused with exit status 2 (1 for a failure at run time) and exactly one
  ``fastalign: error:`` line naming what the case needs named (the file, row, column or key), no
  traceback; or, for valid input, exit status 0 and the right result (checked);
- ``TRACEBACK``: a Python traceback reached the user;
- ``UNCLEAR``: no single error line, one that does not name the file/row/column/key, or exit
  status 1 for a mistake in what was given;
- ``SILENT``: exit status 0 on a mistake, or a value ignored, or a wrong result;
- ``REFUSED_VALID``: valid input refused;
- ``DATA_LOST``: a checkpoint, model or user file lost, or a resumed run that does not end where an
  uninterrupted one ends;
- ``SLOW``: more than 20 s before an error that could be known before any compute (or a hang);
- ``CODE_RUN``: code in a checkpoint or model folder ran.

Per-case results go to ``benchmarks/out/battery.jsonl`` (one JSON object per case) and a table of
counts is printed. Times leave out what a run waited for a CPU, so a busy machine does not make a
case ``SLOW``. To run it against a fixed tree while others edit theirs: ``git archive HEAD fastalign
kernels | tar -x -C SNAP && mv SNAP/kernels SNAP/fastalign/`` and ``PYTHONPATH=SNAP`` (the
commands it runs inherit it). The cases are in ``battery_cases.py`` (one command each) and
``battery_flows.py`` (several commands each). Not part of the test suite: it takes 20-40 minutes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).parent / "out"
CLASSES = ("GOOD", "TRACEBACK", "UNCLEAR", "SILENT", "REFUSED_VALID", "DATA_LOST", "SLOW", "CODE_RUN")
SLOW_S = 20.0
TIMEOUT_S = 240
SENTINEL = "CODE_RAN"  # a file the battery's malicious pickles create when they are unpickled
DELETE = object()  # a config key a case removes from its algorithm's base config
# The command as a user runs it: the venv's console script, else the module.
_SCRIPT = Path(sys.executable).parent / "fastalign"
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "fastalign.cli"]


def _rows(name: str, n: int = 32) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "examples" / name).read_text().splitlines()[:n]]


SFT, PAIRS, PROMPTS = _rows("sft.jsonl"), _rows("pairs.jsonl"), _rows("prompts.jsonl")
DATA = {"sft": SFT, "reward": PAIRS, "dpo": PAIRS, "ppo": PROMPTS}
COMMON = {"model_name_or_path": "fastalign/tiny-llama", "dataset_name": "data.jsonl", "output_dir": "out",
          "max_steps": 2, "max_tokens_per_batch": 256, "learning_rate": 1.0e-3, "logging_steps": 1,
          "disable_tqdm": True}
PAIR_KEYS = {"max_length": 64, "max_prompt_length": 32}
BASE = {
    "sft": {**COMMON, "max_length": 64},
    "reward": {**COMMON, **PAIR_KEYS},
    "dpo": {**COMMON, **PAIR_KEYS},
    "ppo": {**COMMON, "dataset_name": "data.jsonl", "reward_function": "sort_digits", "batch_size": 4,
            "mini_batch_size": 2, "ppo_epochs": 1, "generation_kwargs": {"max_new_tokens": 6, "do_sample": True,
                                                                         "top_k": 0, "top_p": 1.0}},
    "ddpo": {"pipeline_name_or_path": "fastalign/tiny-sd", "reward_function": "jpeg_compressibility",
             "prompt_function": "animals", "output_dir": "out", "num_epochs": 1, "save_freq": 1,
             "mixed_precision": "no", "use_lora": False, "sample_num_steps": 2, "sample_guidance_scale": 1.0,
             "sample_batch_size": 2, "sample_num_batches_per_epoch": 1, "train_batch_size": 2,
             "train_gradient_accumulation_steps": 1, "disable_tqdm": True},
}


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def with_row(rows: list, i: int, row) -> list:
    """``rows`` with row ``i`` replaced by ``row``."""
    return rows[:i] + [row] + rows[i + 1:]


@dataclass
class Case:
    """One command. ``config``: changes to the algorithm's base config (``DELETE`` removes a key), or
    the config file's whole text; ``files``: relative path -> text, bytes, rows (a list, written as
    JSON lines) or ``callable(path)``; ``data.jsonl`` holds the algorithm's example rows unless
    ``files`` gives it. ``expect``: ``usage`` (status 2), ``runtime`` (1), ``error`` (1 or 2), ``ok``
    (0, then ``check``), ``any`` (an error, or 0 and ``check``). ``mentions``: what the error line
    must name (case-insensitive; a tuple inside means one of them). ``check(run) -> problem or
    None``; a problem is ``SILENT`` unless it starts with ``DATA_LOST:``. ``early``: the mistake can be
    known before any compute, so it must fail within 20 s."""

    name: str
    algo: str
    args: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    config: dict | str | None = None
    expect: str = "usage"
    mentions: tuple = ()
    check: object = None
    early: bool = True
    use_config: bool = True
    group: str = ""


@dataclass
class Run:
    """What one command did: status, output, seconds, and its folder."""

    dir: Path
    rc: int
    out: str
    err: str
    seconds: float  # wall time less the time spent waiting for a CPU
    wall: float = 0.0

    @property
    def result(self) -> dict:
        start = self.out.find("{\n")
        try:
            return json.loads(self.out[start:]) if start >= 0 else {}
        except ValueError:
            return {}

    def metrics(self, output="out") -> list[dict]:
        path = self.dir / output / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_files(folder: Path, files: dict) -> None:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, list):
            path.write_text(jsonl(content))
        else:
            path.write_text(content)


def config_text(algo: str, config) -> str:
    if isinstance(config, str):
        return config
    values = dict(BASE[algo])
    for key, value in (config or {}).items():
        if value is DELETE:
            values.pop(key, None)
        else:
            values[key] = value
    return yaml.safe_dump(values, sort_keys=False)


def fastalign(folder: Path, argv: list[str], timeout: float = TIMEOUT_S) -> Run:
    """``fastalign ARGV`` run in ``folder`` as a user runs it. Its ``seconds`` leave out the time its
    main thread waited for a CPU (``/proc/PID/schedstat``): on a machine shared with other work that
    is what the run would take alone, which is what ``SLOW`` judges."""
    env = {k: v for k, v in os.environ.items() if k != "FASTALIGN_DEBUG"}
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    start, waited = time.perf_counter(), 0.0
    with open(folder / ".stdout", "w+") as out, open(folder / ".stderr", "w+") as err:
        proc = subprocess.Popen([*COMMAND, *argv], cwd=folder, env=env, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            waited = max(waited, _queued(proc.pid))
            if time.perf_counter() - start > timeout:
                proc.kill()
                proc.wait()
                err.write(f"\n[battery: killed after {timeout} s]")
                break
            time.sleep(0.05)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        rc = -9 if wall > timeout else proc.returncode
        return Run(folder, rc, out.read(), err.read(), max(0.0, wall - waited), wall)


def _queued(pid: int) -> float:
    """Seconds the process's main thread has waited for a CPU so far."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def prepare(case: Case, folder: Path) -> list[str]:
    """Write the case's files into ``folder``; the command's argv."""
    files = dict(case.files)
    if case.algo in DATA and "data.jsonl" not in files:
        files = {"data.jsonl": DATA[case.algo], **files}
    write_files(folder, files)
    argv = ["train", case.algo] if case.algo else ["train"]
    if case.use_config:
        (folder / "cfg.yaml").write_text(config_text(case.algo, case.config))
        argv += ["--config", "cfg.yaml"]
    return argv + [str(a) for a in case.args]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("fastalign: error:")]


def judge_error(run: Run, expect: str, mentions: tuple, early: bool) -> tuple[str, str]:
    """The class of a run that should have failed."""
    if run.rc == 0:
        return "SILENT", "exit 0 on a mistake"
    if "Traceback (most recent call last)" in run.err:
        return "TRACEBACK", _last(run.err)
    if run.rc == -9:
        return "SLOW", f"no answer in {TIMEOUT_S} s"
    lines = error_lines(run.err)
    if len(lines) != 1:
        return "UNCLEAR", f"status {run.rc}, {len(lines)} error lines: {_last(run.err)}"
    line = lines[0].lower()
    missing = [m for m in mentions if not any(str(x).lower() in line for x in (m if isinstance(m, tuple) else (m,)))]
    if missing:
        return "UNCLEAR", f"does not name {missing}: {lines[0]}"
    if run.rc not in (1, 2) or (expect == "usage" and run.rc != 2) or (expect == "runtime" and run.rc != 1):
        return "UNCLEAR", f"status {run.rc} ({expect} expected): {lines[0]}"
    if early and run.seconds > SLOW_S:
        return "SLOW", f"{run.seconds:.0f} s: {lines[0]}"
    return "GOOD", lines[0]


def judge(case: Case, run: Run) -> tuple[str, str]:
    if (run.dir / SENTINEL).exists():
        return "CODE_RUN", "the malicious pickle ran"
    if case.expect in ("ok", "any") and run.rc == 0:
        problem = case.check(run) if case.check else finished()(run)
        if problem:
            return ("DATA_LOST", problem[10:]) if problem.startswith("DATA_LOST:") else ("SILENT", problem)
        return "GOOD", "done: " + json.dumps({k: run.result.get(k) for k in ("steps", "epochs") if k in run.result})
    if case.expect == "ok":
        if "Traceback (most recent call last)" in run.err:
            return "TRACEBACK", _last(run.err)
        return "REFUSED_VALID", f"status {run.rc}: {_last(run.err)}"
    kind, why = judge_error(run, case.expect, case.mentions, case.early)
    if kind == "GOOD" and case.check is not None and case.expect != "any":
        problem = case.check(run)  # an error case's own check: what must survive the refusal
        if problem:
            return ("DATA_LOST", problem[10:]) if problem.startswith("DATA_LOST:") else ("SILENT", problem)
    return kind, why


def _last(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


# Checks of a finished run (each returns a problem, or None).
def weights(folder: Path, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / name))


def finished(steps: int | None = 2, output: str = "out", name: str = "model.safetensors"):
    def check(run: Run):
        import torch

        if steps is not None and run.result.get("steps") != steps:
            return f"ran {run.result.get('steps')} steps, not {steps}"
        path = run.dir / output / name
        if not path.exists():
            return f"no {output}/{name}"
        bad = [k for k, v in weights(run.dir / output, name).items() if not torch.isfinite(v).all()]
        return f"non-finite weights saved: {bad[:3]}" if bad else None
    return check


def all_of(*checks):
    def check(run: Run):
        return next((p for p in (c(run) for c in checks) if p), None)
    return check


def says(pattern: str, what: str):
    """The run's output matches ``pattern`` (a report the user must see)."""
    def check(run: Run):
        return None if re.search(pattern, run.err + run.out) else f"does not say {what}"
    return check


def logged(key: str):
    def check(run: Run):
        return None if any(key in record for record in run.metrics()) else f"no {key!r} in metrics.jsonl"
    return check


def run_case(case: Case, root: Path) -> dict:
    folder = root / re.sub(r"[^\w.-]+", "_", case.name)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    try:
        if callable(getattr(case, "flow", None)):
            kind, why, seconds = case.flow(folder)
        else:
            run = fastalign(folder, prepare(case, folder))
            (kind, why), seconds = judge(case, run), run.seconds
    except Exception as error:  # a battery bug: shown, counted apart
        kind, why, seconds = "BATTERY_ERROR", f"{type(error).__name__}: {error}", time.perf_counter() - started
    return {"name": case.name, "algo": case.algo, "group": case.group, "class": kind, "detail": why,
            "seconds": round(seconds, 1)}


def all_cases() -> list:
    from benchmarks.battery_cases import cases
    from benchmarks.battery_flows import flows

    return cases() + flows()


def table(results: list[dict]) -> str:
    counts = collections.Counter(r["class"] for r in results)
    rows = [f"| {k} | {counts.get(k, 0)} |" for k in CLASSES + ("BATTERY_ERROR",) if counts.get(k) or k in CLASSES]
    good = counts.get("GOOD", 0)
    return "\n".join(["| class | cases |", "|---|---|", *rows,
                      f"| **total** | {len(results)} ({100 * good / max(1, len(results)):.1f}% GOOD) |"])


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {date.today().isoformat()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.battery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(OUT / "battery.jsonl"), help="per-case results (JSON lines)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    parser.add_argument("-k", dest="select", action="append", default=[], help="only cases whose name holds this")
    parser.add_argument("--list", action="store_true", help="list the cases and stop")
    parser.add_argument("--keep", action="store_true", help="keep the cases' folders (printed)")
    args = parser.parse_args(argv)
    cases = [c for c in all_cases() if not args.select or any(s in c.name for s in args.select)]
    if args.list:
        print("\n".join(f"{c.algo:7} {c.name}" for c in cases), f"\n{len(cases)} cases", sep="")
        return 0
    root = Path(tempfile.mkdtemp(prefix="fastalign-battery-"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    with open(out, "w") as f, ThreadPoolExecutor(args.jobs) as pool:
        for n, result in enumerate(pool.map(lambda c: run_case(c, root), cases), 1):
            results.append(result)
            f.write(json.dumps(result) + "\n")
            f.flush()
            mark = "" if result["class"] == "GOOD" else "  <--"
            print(f"[{n}/{len(cases)}] {result['class']:13} {result['seconds']:5.1f}s {result['name']}: "
                  f"{result['detail'][:160]}{mark}", flush=True)
    print(f"\n{machine()}\n\n{table(results)}")
    if args.keep:
        print(f"folders kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":  # run as the imported module, so the cases share its names (DELETE)
    from benchmarks.battery import main as battery_main

    sys.exit(battery_main())
