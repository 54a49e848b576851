"""Every command line of the README's shell blocks runs as written from a fresh clone (its configs/
and examples/, copied), in order, each training command cut to a few steps."""

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Appended to each `train ALGO` command: a few steps of the tiny built-in models.
SHORT = {
    "sft": ["--max_steps", "2"], "dpo": ["--max_steps", "2"], "reward": ["--max_steps", "2"],
    "ppo": ["--max_steps", "2", "--batch_size", "16", "--mini_batch_size", "8", "--generation_kwargs", "{max_new_tokens: 4}"],
    "ddpo": ["--num_epochs", "1", "--sample_num_steps", "4"],
    **{algo: ["--max_steps", "2"] for algo in ("orpo", "cpo", "simpo", "kto")},
    **{algo: ["--max_steps", "2", "--per_device_train_batch_size", "16", "--num_generations", "4",
              "--max_completion_length", "4"] for algo in ("grpo", "rloo")},
}


def readme_commands() -> list[list[str]]:
    """The ``fastalign ...`` and ``torchrun ...`` lines of the README's bash blocks, as argv lists."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line, comments=True) for line in lines if line.startswith(("fastalign ", "torchrun "))]


def shortened(argv: list[str]) -> list[str]:
    """``argv`` with the few-steps options of its algorithm appended (none for help or plot)."""
    if "train" not in argv or "--help" in argv:
        return argv
    return argv + SHORT[argv[argv.index("train") + 1]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_commands_run_as_written(tmp_path, monkeypatch, fastalign):
    commands = readme_commands()
    trained = {argv[argv.index("train") + 1] for argv in commands if "train" in argv and "--help" not in argv}
    assert trained == set(SHORT) and any(argv[0] == "torchrun" for argv in commands)
    for folder in ("configs", "examples"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        if argv[0] == "torchrun":  # its own processes, on a free port
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--master_port", str(free_port()),
                                   *shortened(argv[1:])], capture_output=True, text=True, timeout=300)
            status, err = done.returncode, done.stderr
            # One result (the main process's), and no library's deprecation warnings in the bar.
            assert status != 0 or (json.loads(done.stdout)["steps"] == 2 and "Warning" not in err), done.stdout + err
        else:
            status, _, err = fastalign(shortened(argv[1:]))
        assert status == 0, f"{shlex.join(argv)} exited with {status}: {err[-3000:]}"
    assert (tmp_path / "runs" / "sft" / "plots" / "loss.png").exists()
