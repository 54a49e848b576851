"""``fastalign plot RUN_DIR``: PNG curves of a run's ``metrics.jsonl`` (needs matplotlib).

One figure per metric, against the optimizer step; a training metric and its ``eval/`` twin share
a figure (``loss.png`` holds both the training and the evaluation loss). Written to
``RUN_DIR/plots/``.
"""

from __future__ import annotations

from pathlib import Path

from .metrics import METRICS_FILE, read_metrics

SKIP = {"step", "epoch", "num_tokens", "padding_fraction"}


def plot_run(run_dir) -> list[Path]:
    """Write the PNGs of ``run_dir``; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("fastalign plot needs matplotlib: pip install 'fastalign[plot]'") from err
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir / METRICS_FILE}: missing or empty, nothing to plot")
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((record["step"], value))
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    for name in sorted({k.removeprefix("eval/") for k in series}):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in ((name, "train"), (f"eval/{name}", "eval")):
            if key in series:
                steps, values = zip(*series[key])
                ax.plot(steps, values, marker="o" if label == "eval" else None, markersize=3, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / (name.replace("/", "_") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
