"""The battery's flows (``benchmarks.battery``): cases of several commands. A run killed with
SIGKILL at a random moment (while training, while saving a checkpoint, before the first one, at
the end) and resumed must end with the weights of an uninterrupted run and its losses; a corrupted
checkpoint must be refused naming its file, and run no code; an output folder must keep what it
holds unless told otherwise; a model folder must run no code."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.battery import (
    COMMAND,
    DELETE,
    SENTINEL,
    SFT,
    Case,
    Run,
    all_of,
    error_lines,
    fastalign,
    finished,
    jsonl,
    judge,
    prepare,
    weights,
)


@dataclass
class Flow:
    name: str
    algo: str
    flow: object  # callable(folder) -> (class, detail, seconds)
    group: str = "flow"


# The runs killed and resumed: long enough to be killed in the middle, a checkpoint every step.
KILL = {
    "sft": {"max_steps": 6, "save_steps": 1, "max_tokens_per_batch": 128},
    "reward": {"max_steps": 6, "save_steps": 1, "max_tokens_per_batch": 128},
    "dpo": {"max_steps": 6, "save_steps": 1, "max_tokens_per_batch": 128},
    "ppo": {"max_steps": 4, "save_steps": 1},
    "ddpo": {"num_epochs": 3, "save_freq": 1},
}
STEPS = {"sft": 6, "reward": 6, "dpo": 6, "ppo": 4, "ddpo": 3}
RESUME = {"ddpo": "--resume_from"}
WEIGHTS = {"ppo": ["model.safetensors", "value_head.safetensors"], "ddpo": ["unet/diffusion_pytorch_model.safetensors"]}
_LOCK = threading.Lock()
_SHARED: dict = {}


def shared_run(root: Path, key: str, algo: str, config: dict) -> Path:
    """A run made once for every flow that needs it (an uninterrupted reference, a base to corrupt):
    its folder."""
    with _LOCK:
        if key not in _SHARED:
            folder = root / f"_shared_{key}"
            folder.mkdir()
            run = fastalign(folder, prepare(Case(key, algo, config=config), folder))
            if run.rc != 0:
                raise RuntimeError(f"the shared run {key} failed: {run.err.strip().splitlines()[-1:]}")
            _SHARED[key] = folder
        return _SHARED[key]


def same_weights(a: Path, b: Path, algo: str) -> str | None:
    import torch

    for name in WEIGHTS.get(algo, ["model.safetensors"]):
        if not (a / name).exists() or not (b / name).exists():
            return f"no {name} to compare"
        x, y = weights(a, name), weights(b, name)
        if set(x) != set(y):
            return f"{name} holds other tensors than the uninterrupted run's"
        if not all(torch.equal(x[k], y[k]) for k in x):
            diff = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
            return f"{name} differs from the uninterrupted run's (max |diff| {diff:.2e})"
    return None


def same_losses(run: Run, reference: Run, steps: int) -> str | None:
    """Every step logged, with the uninterrupted run's loss (the last record of each step wins)."""
    key = next((k for k in ("loss", "ppo/loss/total", "reward_mean") if any(k in r for r in reference.metrics())), None)
    ours = {r["step"]: r.get(key) for r in run.metrics() if "step" in r}
    theirs = {r["step"]: r.get(key) for r in reference.metrics() if "step" in r}
    missing = sorted(set(range(1, steps + 1)) - set(ours))
    if missing:
        return f"metrics.jsonl lost steps {missing}"
    off = [s for s in theirs if s in ours and theirs[s] is not None and abs(ours[s] - theirs[s]) > 1e-6]
    return f"losses differ at steps {off}" if off else None


def _wait(folder: Path, proc, trigger, rng: random.Random) -> str:
    """Wait for ``trigger`` (then SIGKILL the run's process group); what the kill hit."""
    out = folder / "out"
    kind, arg = trigger
    deadline = time.perf_counter() + 300
    start = time.perf_counter()
    while proc.poll() is None and time.perf_counter() < deadline:
        if kind == "time" and time.perf_counter() - start >= arg:
            return f"{arg:.1f} s after start"
        if kind == "checkpoint" and (out / f"checkpoint-{arg}").is_dir():
            time.sleep(rng.uniform(0, 0.3))
            return f"after checkpoint-{arg} + a random delay"
        if kind == "saving" and any(out.glob(".tmp-checkpoint-*")) and (arg is None or (out / f".tmp-checkpoint-{arg}").exists()):
            return "while saving a checkpoint"
        if kind == "final" and (out / "model.safetensors").exists():
            return "while saving the final model"
        time.sleep(0.002)
    return "never (the run had ended)"


def _resume_argv(folder: Path, argv: list, algo: str) -> list:
    """The command again, resuming when the killed run left a checkpoint."""
    if list((folder / "out").glob("checkpoint-*")):
        return argv + [RESUME.get(algo, "--resume_from_checkpoint"), "true"]
    return argv


def kill_flow(algo: str, triggers: list, seed: int):
    """The run killed at each of ``triggers`` in turn (each time started again as a user would:
    resuming when there is a checkpoint), then run to its end."""
    def flow(folder: Path):
        rng = random.Random(seed)
        reference = shared_run(folder.parent, f"ref_{algo}", algo, KILL[algo])
        argv = prepare(Case("kill", algo, config=KILL[algo]), folder)
        started, notes = time.perf_counter(), []
        for k, trigger in enumerate(triggers):
            with open(folder / f"killed{k}.err", "w") as err:
                proc = subprocess.Popen([*COMMAND, *_resume_argv(folder, argv, algo)], cwd=folder, stdout=err,
                                        stderr=err, start_new_session=True)
                hit = _wait(folder, proc, trigger, rng)
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            notes.append(f"killed {hit}")
        resuming = _resume_argv(folder, argv, algo) != argv
        run = fastalign(folder, _resume_argv(folder, argv, algo))
        if run.rc == 2 and not resuming:
            notes.append("a rerun needed overwrite_output_dir: " + (error_lines(run.err) or ["?"])[0][18:120])
            run = fastalign(folder, argv + ["--overwrite_output_dir", "true"])
        seconds = time.perf_counter() - started
        if run.rc != 0:
            return judge(Case("resume", algo, expect="ok"), run) + (seconds,)
        if resuming and "resumed from" not in run.err:
            return "SILENT", "; ".join(notes + ["the resumed run does not say which checkpoint it resumed from"]), seconds
        ref_run = Run(reference, 0, "", "", 0)
        problem = same_weights(folder / "out", reference / "out", algo) or same_losses(run, ref_run, STEPS[algo])
        if problem:
            return "DATA_LOST", "; ".join(notes + [problem]), seconds
        return "GOOD", "; ".join(notes + ["resumed to the uninterrupted run's weights and losses"]), seconds
    return flow


def signal_flow(algo: str, sig: int, seed: int):
    """Ctrl-C (SIGINT to the process group) or a scheduler's SIGTERM after the second checkpoint:
    the run must stop with 128 + the signal and one line naming the checkpoint to resume from (no
    traceback), and the resumed run end with the uninterrupted run's weights and losses."""
    def flow(folder: Path):
        rng = random.Random(seed)
        reference = shared_run(folder.parent, f"ref_{algo}", algo, KILL[algo])
        argv = prepare(Case("signal", algo, config=KILL[algo]), folder)
        started = time.perf_counter()
        with open(folder / "stopped.err", "w") as err:
            proc = subprocess.Popen([*COMMAND, *argv], cwd=folder, stdout=err, stderr=err, start_new_session=True)
            hit = _wait(folder, proc, ("checkpoint", 2), rng)
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
            try:
                rc = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return "SLOW", f"{signal.Signals(sig).name} {hit}: still running 120 s later", time.perf_counter() - started
        said = (folder / "stopped.err").read_text()
        name = signal.Signals(sig).name
        if hit.startswith("never"):
            return "UNCLEAR", "the run ended before the signal (make it longer)", time.perf_counter() - started
        if rc == 0 and "Traceback" not in said:  # the signal came in the last step: the run ends whole
            problem = same_weights(folder / "out", reference / "out", algo)
            seconds = time.perf_counter() - started
            if problem:
                return "DATA_LOST", f"{name} {hit}: finished, but {problem}", seconds
            return "GOOD", f"{name} {hit}, in the last step: the run finished with the uninterrupted run's weights", seconds
        if "Traceback" in said or rc != 128 + sig:
            return "TRACEBACK" if "Traceback" in said else "UNCLEAR", f"{name} {hit}: status {rc}", time.perf_counter() - started
        lines = [line for line in said.splitlines() if "interrupted at step" in line]
        if len(lines) != 1 or "checkpoint-" not in lines[0]:
            return "UNCLEAR", f"{name}: no single line naming the checkpoint ({lines})", time.perf_counter() - started
        run = fastalign(folder, _resume_argv(folder, argv, algo))
        seconds = time.perf_counter() - started
        if run.rc != 0:
            return judge(Case("resume", algo, expect="ok"), run) + (seconds,)
        problem = same_weights(folder / "out", reference / "out", algo) or same_losses(run, Run(reference, 0, "", "", 0),
                                                                                       STEPS[algo])
        if problem:
            return "DATA_LOST", f"{name} {hit}: {problem}", seconds
        return "GOOD", f"{name} {hit}: {lines[0].strip()}; resumed to the uninterrupted run's weights and losses", seconds
    return flow


def kill_flows() -> list[Flow]:
    plan = [
        ("sft", ("checkpoint", 2)), ("sft", ("saving", 3)), ("sft", ("time", 1.0)), ("sft", ("final", None)),
        ("sft", ("checkpoint", 4)), ("reward", ("checkpoint", 3)), ("reward", ("saving", 2)), ("reward", ("saving", 5)),
        ("dpo", ("checkpoint", 1)), ("dpo", ("saving", 4)), ("dpo", ("final", None)),
        ("ppo", ("checkpoint", 2)), ("ppo", ("saving", 3)), ("ddpo", ("checkpoint", 1)),
    ]
    flows = [Flow(f"{algo}/kill-{kind}-{arg}".replace("-None", ""), algo, kill_flow(algo, [(kind, arg)], seed=i),
                  "kill") for i, (algo, (kind, arg)) in enumerate(plan)]
    stops = [("sft", signal.SIGINT), ("dpo", signal.SIGTERM), ("ppo", signal.SIGINT), ("ddpo", signal.SIGTERM)]
    flows += [Flow(f"{algo}/stop-{signal.Signals(sig).name.lower()}", algo, signal_flow(algo, sig, seed=30 + i), "kill")
              for i, (algo, sig) in enumerate(stops)]
    return flows + [
        Flow("sft/kill-twice", "sft", kill_flow("sft", [("checkpoint", 2), ("saving", 4)], seed=20), "kill"),
        Flow("dpo/kill-while-loading", "dpo", kill_flow("dpo", [("time", 4.0)], seed=21), "kill"),
    ]


class Evil:
    """Unpickled, it writes a file: the proof that a checkpoint ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def evil_torch(path: Path, sentinel: Path) -> None:
    import torch

    torch.save({"optimizer": Evil(sentinel), "scheduler": None}, path)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BASE = {"max_steps": 2, "save_steps": 1}
# name -> (what is done to out/checkpoint-2, what the error must name, the resume target)
CORRUPT = {
    "truncated-safetensors": (lambda c, s: truncate(c / "model.safetensors"), ["model.safetensors"]),
    "deleted-safetensors": (lambda c, s: (c / "model.safetensors").unlink(), ["safetensors"]),
    "deleted-trainer-state-json": (lambda c, s: (c / "trainer_state.json").unlink(), ["trainer_state.json"]),
    "garbage-trainer-state-json": (lambda c, s: (c / "trainer_state.json").write_text("{oops"), ["trainer_state.json"]),
    "wrong-step-trainer-state-json": (lambda c, s: (c / "trainer_state.json").write_text('{"step": "two"}'),
                                      ["trainer_state.json"]),
    "garbage-trainer-state-pt": (lambda c, s: (c / "trainer_state.pt").write_bytes(b"\x00garbage" * 50),
                                 ["trainer_state.pt"]),
    "truncated-trainer-state-pt": (lambda c, s: truncate(c / "trainer_state.pt"), ["trainer_state.pt"]),
    "deleted-trainer-state-pt": (lambda c, s: (c / "trainer_state.pt").unlink(), ["trainer_state.pt"]),
    "malicious-trainer-state-pt": (lambda c, s: evil_torch(c / "trainer_state.pt", s), ["trainer_state.pt"]),
    "malicious-rng-pickle": (lambda c, s: (c / "rng_rank0.pt").write_bytes(pickle.dumps(Evil(s))), ["rng_rank0.pt"]),
    "malicious-rng-torch": (lambda c, s: evil_torch(c / "rng_rank0.pt", s), ["rng_rank0.pt"]),
    "deleted-rng": (lambda c, s: (c / "rng_rank0.pt").unlink(), ["rng"]),
    "emptied-checkpoint": (lambda c, s: [p.unlink() for p in list(c.iterdir())], ["checkpoint-2"]),
    # A resume reads the weights, not config.json (the model comes from model_name_or_path): it may go on.
    "truncated-config-json": (lambda c, s: truncate(c / "config.json"), ["config.json"]),
}
MAY_GO_ON = {"truncated-config-json"}


def corrupt_flow(algo: str, name: str, damage, mentions, target="true"):
    def flow(folder: Path):
        base = shared_run(folder.parent, f"base_{algo}", algo, BASE)
        shutil.copytree(base / "out", folder / "out")
        damage(folder / "out" / "checkpoint-2", folder / SENTINEL)
        argv = prepare(Case(name, algo, config={"max_steps": 4, "save_steps": 1}), folder)
        run = fastalign(folder, argv + [RESUME.get(algo, "--resume_from_checkpoint"), target])
        expect = "any" if name in MAY_GO_ON else "usage"
        check = finished(None) if expect == "any" else None
        return judge(Case(name, algo, expect=expect, mentions=tuple(mentions), check=check), run) + (run.seconds,)
    return flow


def corrupt_flows() -> list[Flow]:
    out = [Flow(f"sft/ckpt-{name}", "sft", corrupt_flow("sft", name, d, m), "checkpoint") for name, (d, m) in CORRUPT.items()]
    for algo, name in (("dpo", "malicious-trainer-state-pt"), ("reward", "garbage-trainer-state-pt"),
                       ("ppo", "malicious-rng-torch"), ("ppo", "truncated-safetensors")):
        damage, mentions = CORRUPT[name]
        out.append(Flow(f"{algo}/ckpt-{name}", algo, corrupt_flow(algo, name, damage, mentions), "checkpoint"))
    out.append(Flow("ppo/ckpt-truncated-value-head", "ppo", corrupt_flow(
        "ppo", "vh", lambda c, s: truncate(c / "value_head.safetensors"), ["value_head.safetensors"]), "checkpoint"))
    out.append(Flow("sft/ckpt-resume-by-path-corrupt", "sft", corrupt_flow(
        "sft", "path", lambda c, s: truncate(c / "model.safetensors"), ["model.safetensors"], "out/checkpoint-2"),
        "checkpoint"))
    return out


def tree_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "plots" not in p.parts}


def outdir_flow(algo: str, name: str, args: list, expect: str, mentions=(), changes=None, kept=True, setup=None,
                check=None):
    """A second run into the output folder of a finished SFT run (``base_sft``): ``kept``, what was
    there must be there after it."""
    def flow(folder: Path):
        base = shared_run(folder.parent, "base_sft", "sft", BASE)
        shutil.copytree(base / "out", folder / "out")
        (folder / "out" / "notes.txt").write_text("the user's own notes")
        if setup:
            setup(folder)
        before = tree_hash(folder / "out")
        argv = prepare(Case(name, algo, config={**BASE, **(changes or {})}), folder)
        run = fastalign(folder, argv + args)
        kind, why = judge(Case(name, algo, expect=expect, mentions=tuple(mentions), check=check), run)
        after = tree_hash(folder / "out")
        lost = sorted(k for k in before if k not in after) if kept else []
        if not (folder / "out" / "notes.txt").exists():
            lost = ["notes.txt (the user's own file)"]
        if lost and kind in ("GOOD", "SILENT"):
            kind, why = "DATA_LOST", f"lost {lost[:4]}: {why}"
        return kind, why, run.seconds
    return flow


def outdir_flows() -> list[Flow]:
    other = {"dataset_name": "other.jsonl"}

    def other_data(folder):
        (folder / "other.jsonl").write_text(jsonl(SFT[:20]))

    plan = [
        ("sft/outdir-reuse-refused", "sft", [], "usage", ["out"], None, True, None),
        ("sft/outdir-overwrite", "sft", ["--overwrite_output_dir", "true"], "ok", [], None, False, None),
        ("sft/outdir-resume-extend", "sft", ["--resume_from_checkpoint", "true"], "ok", [], {"max_steps": 4}, False, None),
        ("sft/outdir-resume-past-end", "sft", ["--resume_from_checkpoint", "true"], "usage", ["checkpoint-2"],
         {"max_steps": 1}, True, None),
        ("sft/outdir-resume-other-data", "sft", ["--resume_from_checkpoint", "true"], "usage", ["data"], other, True,
         other_data),
        ("sft/outdir-resume-other-model", "sft", ["--resume_from_checkpoint", "true"], "usage", ["model"],
         {"model_name_or_path": "fastalign/tiny-qwen2"}, True, None),
        ("dpo/outdir-of-sft-refused", "dpo", [], "usage", ["out"], None, True, None),
        ("dpo/outdir-of-sft-resume", "dpo", ["--resume_from_checkpoint", "true"], "usage", ["data"], None, True, None),
        ("ppo/outdir-of-sft-refused", "ppo", [], "usage", ["out"], None, True, None),
        ("sft/resume-into-another-folder", "sft", ["--output_dir", "out2", "--resume_from_checkpoint", "out/checkpoint-2"],
         "any", ["checkpoint-2"], {"max_steps": 4}, True, None),
        ("sft/resume-into-another-folder-other-data", "sft", ["--output_dir", "out2", "--resume_from_checkpoint",
                                                               "out/checkpoint-2"], "usage", ["data"], other, True,
         other_data),
    ]
    checks = {"sft/outdir-resume-extend": all_of(finished(None), last_step(4), learning_after(2)),
              "sft/resume-into-another-folder": all_of(finished(None, "out2"), last_step(4, "out2"))}
    flows = [Flow(n, a, outdir_flow(a, n, args, e, m, c, k, s, check=checks.get(n)), "outdir")
             for n, a, args, e, m, c, k, s in plan]
    flows += [Flow("sft/outdir-user-files-only", "sft", user_files_flow, "outdir"),
              Flow("sft/outdir-after-failed-run", "sft", after_failure_flow, "outdir"),
              Flow("sft/outdir-is-cwd", "sft", cwd_output_flow, "outdir"),
              Flow("sft/seed-honoured", "sft", seed_flow, "valid"),
              Flow("dpo/model-from-sft-run", "dpo", model_from_run_flow, "model"),
              Flow("sft/model-truncated-safetensors", "sft", model_damage_flow("truncated"), "model"),
              Flow("sft/model-malicious-bin", "sft", model_damage_flow("malicious"), "model"),
              Flow("sft/model-remote-code", "sft", model_damage_flow("remote"), "model"),
              Flow("ppo/reward-model-from-run", "ppo", reward_model_flow, "model")]
    return flows


def last_step(step: int, output: str = "out"):
    def check(run: Run):
        steps = [r["step"] for r in run.metrics(output) if "step" in r]
        return None if steps and steps[-1] == step else f"{output}/metrics.jsonl ends at step {steps[-1:]}, not {step}"
    return check


def learning_after(step: int):
    """Every step after ``step`` (a resumed run's) had a learning rate above 0."""
    def check(run: Run):
        stalled = [r["step"] for r in run.metrics() if r.get("step", 0) > step and r.get("lr", 1) <= 0]
        return f"steps {stalled} ran at learning rate 0" if stalled else None
    return check


def user_files_flow(folder: Path):
    (folder / "out").mkdir()
    (folder / "out" / "notes.txt").write_text("mine")
    run = fastalign(folder, prepare(Case("u", "sft"), folder) + ["--overwrite_output_dir", "true"])
    kind, why = judge(Case("u", "sft", expect="ok"), run)
    if kind == "GOOD" and not (folder / "out" / "notes.txt").exists():
        kind, why = "DATA_LOST", "overwrite_output_dir deleted the user's notes.txt"
    return kind, why, run.seconds


def after_failure_flow(folder: Path):
    argv = prepare(Case("f", "sft", files={"data.jsonl": "{broken\n"}), folder)
    first = fastalign(folder, argv)
    (folder / "data.jsonl").write_text(jsonl(SFT))  # the mistake fixed, the same command again
    run = fastalign(folder, argv)
    kind, why = judge(Case("f", "sft", expect="ok"), run)
    return kind, f"first run status {first.rc}; rerun: {why}", first.seconds + run.seconds


def cwd_output_flow(folder: Path):
    run = fastalign(folder, prepare(Case("c", "sft", config={"output_dir": "."}), folder))
    kind, why = judge(Case("c", "sft", expect="ok", check=finished(output=".")), run)
    if not (folder / "data.jsonl").exists() or not (folder / "cfg.yaml").exists():
        kind, why = "DATA_LOST", "the data or config in the output folder was deleted"
    return kind, why, run.seconds


def seed_flow(folder: Path):
    runs = []
    for k, seed in enumerate((1, 1, 2)):
        sub = folder / f"s{k}"
        sub.mkdir()
        runs.append(fastalign(sub, prepare(Case("s", "sft", config={"seed": seed}), sub)))
    seconds = sum(r.seconds for r in runs)
    if any(r.rc for r in runs):
        return "REFUSED_VALID", "a seeded run failed", seconds
    same = same_weights(folder / "s0" / "out", folder / "s1" / "out", "sft")
    differ = same_weights(folder / "s0" / "out", folder / "s2" / "out", "sft")
    if same:
        return "SILENT", f"the same seed twice: {same}", seconds
    if not differ:
        return "SILENT", "seed 1 and seed 2 end with the same weights (seed ignored)", seconds
    return "GOOD", "the same seed repeats, another seed differs", seconds


def model_from_run_flow(folder: Path):
    base = shared_run(folder.parent, "base_sft", "sft", BASE)
    run = fastalign(folder, prepare(Case("m", "dpo", config={"model_name_or_path": str(base / "out")}), folder))
    return judge(Case("m", "dpo", expect="ok"), run) + (run.seconds,)


def reward_model_flow(folder: Path):
    base = shared_run(folder.parent, "base_reward", "reward", BASE)
    run = fastalign(folder, prepare(Case("m", "ppo", config={"reward_function": DELETE}), folder) +
                    ["--reward_model_name_or_path", str(base / "out")])
    return judge(Case("m", "ppo", expect="ok"), run) + (run.seconds,)


def model_damage_flow(kind: str):
    def flow(folder: Path):
        base = shared_run(folder.parent, "base_sft", "sft", BASE)
        model = folder / "mymodel"
        shutil.copytree(base / "out", model, ignore=shutil.ignore_patterns("checkpoint-*", "plots", "metrics.jsonl"))
        if kind == "truncated":
            truncate(model / "model.safetensors")
            mentions, expect = ["model.safetensors"], "usage"
        elif kind == "malicious":
            (model / "model.safetensors").unlink()
            evil_torch(model / "pytorch_model.bin", folder / SENTINEL)
            mentions, expect = [("pytorch_model.bin", "mymodel")], "error"
        else:
            import json

            config = json.loads((model / "config.json").read_text())
            config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
            (model / "config.json").write_text(json.dumps(config))
            (model / "evil.py").write_text(f"open({str(folder / SENTINEL)!r}, 'w').write('ran')\n")
            mentions, expect = [("trust_remote_code", "mymodel")], "any"
        run = fastalign(folder, prepare(Case("m", "sft", config={"model_name_or_path": "mymodel"}), folder))
        return judge(Case("m", "sft", expect=expect, mentions=tuple(mentions)), run) + (run.seconds,)
    return flow


def flows() -> list[Flow]:
    return kill_flows() + corrupt_flows() + outdir_flows()
