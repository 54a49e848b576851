"""Run logging: a tqdm progress bar with live metrics, ``metrics.jsonl``, TensorBoard when asked.

Every record of ``OUTPUT_DIR/metrics.jsonl`` is one JSON object with the optimizer ``step`` and
the metrics at that step (``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ..., evaluation
metrics prefixed ``eval/``). Lines are flushed as they are written, so a killed run keeps what it
logged; a resumed run first drops the records after its checkpoint's step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
BAR_KEYS = ("loss", "tokens_per_s", "lr")


def read_metrics(run_dir) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; a line cut short by a kill is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLogger:
    """Writes metrics on the main process only; other processes get a silent logger."""

    def __init__(self, output_dir, total_steps: int, start_step: int = 0, report_to=(), enabled=True,
                 show_bar=True, bar_keys=BAR_KEYS, bar_initial: int | None = None, bar_desc: str = "train",
                 bar_unit: str = "step"):
        """The bar counts ``total_steps`` from ``bar_initial`` (default ``start_step``) in ``bar_unit``;
        a resumed run (``start_step`` > 0) keeps the records of ``metrics.jsonl`` up to its step."""
        self.enabled = enabled
        self.bar_keys = bar_keys
        self.bar = None
        self.writer = None
        self.file = None
        if not enabled:
            return
        root = Path(output_dir)
        root.mkdir(parents=True, exist_ok=True)
        path = root / METRICS_FILE
        kept = [r for r in read_metrics(root) if r.get("step", 0) <= start_step] if start_step else []
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(path, "a")
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("report_to=['tensorboard'] needs tensorboard: pip install 'fastalign[tensorboard]'") from err
            self.writer = SummaryWriter(log_dir=str(root / "tensorboard"))
        if show_bar:
            initial = start_step if bar_initial is None else bar_initial
            self.bar = tqdm(total=total_steps, initial=initial, desc=bar_desc, unit=bar_unit, dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        self.show(record)

    def show(self, metrics: dict) -> None:
        """The ``bar_keys`` of ``metrics`` beside the bar (``log`` shows each record's)."""
        if self.bar is not None:
            shown = {k: _short(metrics[k]) for k in self.bar_keys if k in metrics}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, message: str) -> None:
        """A line printed above the bar (or plainly when there is none), main process only."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


def peak_memory_gb(device) -> float:
    """The run's peak memory so far: allocated on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _plain(value):
    return float(value) if hasattr(value, "item") else value


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else value
