"""``fastalign plot``: PNG curves from metrics.jsonl, killed-run lines skipped."""

import json

import pytest

from fastalign.cli import main

pytest.importorskip("matplotlib", reason="fastalign plot needs matplotlib (the plot extra)")


def test_plot_writes_one_png_per_metric(tmp_path, capsys):
    lines = [json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-3, "epoch": s / 4}) for s in range(1, 5)]
    lines += [json.dumps({"step": 4, "eval/loss": 0.9, "eval/rewards/accuracies": 0.7}), '{"step": 5, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert main(["plot", str(tmp_path)]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["loss.png", "lr.png", "rewards_accuracies.png"]
    for name in names:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss.png" in capsys.readouterr().out


def test_plot_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"fastalign: error: {tmp_path / 'metrics.jsonl'}: missing or empty, nothing to plot\n"
