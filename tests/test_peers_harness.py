"""The end-to-end comparison's harness (benchmarks/peers) without TRL: its tables and chart for both
profiles from synthetic runs, and the GPU profile's preparation and fastalign probe on a small
stand-in model. The GPU profile runs for real only on a lent GPU, whose time is short: a
formatting or set-up bug should show here first."""

import json

import pytest

from benchmarks.peers import compare, workload

GIB = 2**30


def _run(system: str, rnd: int, tokens_per_s: float, rss: float, gpu: float | None) -> dict:
    return {
        "system": system, "algo": "dpo", "round": rnd, "tokens_per_s": tokens_per_s, "seconds_per_step": 1.0,
        "cpu_seconds_per_step": 2.0, "peak_rss_bytes": rss * GIB, "built_rss_bytes": rss * GIB / 2,
        "peak_gpu_bytes": None if gpu is None else gpu * GIB, "real_tokens_per_step": 1000.0,
        "pad_share": 0.0 if system == "fastalign" else 0.5, "losses": [0.6931, 0.6], "grad_norms": [1.5, 1.2],
        "steps": 2, "data_digest": "same", "attention": "sdpa", "parameters": 494_000_000,
        "load_before": 1.0,
    }


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_tables_and_chart(profile, tmp_path):
    on_gpu = profile == "gpu"
    runs = []
    for rnd in range(2):
        runs.append(_run("fastalign", rnd, 2000.0, 3.0, 1.0 if on_gpu else None))
        runs.append(_run("trl", rnd, 1000.0, 2.0, 4.0 if on_gpu else None))
    runs.append({"system": "trl-liger", "algo": "dpo", "round": 0, "error": "RuntimeError: 0 active drivers"})
    summary = compare.aggregate(runs)
    ratios = summary["dpo"]["ratios"]["fastalign/trl"]
    assert ratios["speedup"] == [2.0, 2.0]
    # On a GPU the memory that bounds a run is the GPU's (1 of 4 GiB), not the resident set (3 of 2).
    assert ratios["memory"] == pytest.approx([0.25, 0.25] if on_gpu else [1.5, 1.5])
    meta = {"date": "2026-11-21 12:00", "rounds": 2, "python": "3.12.3",
            "machine": "x86_64, 16 cores, 16 torch threads",
            "torch": "2.11.0", "transformers": "5.17.0", "peers": {"trl": "1.16.0", "liger_kernel": "0.8.5"},
            "load": [0.5, 1.0], "profile": profile, "device": "NVIDIA H200" if on_gpu else "cpu"}
    text = compare.table(summary, meta)
    assert ("peak GPU memory" in text) == on_gpu
    assert ("Qwen2-0.5B-shaped" in text) == on_gpu and ("bf16 autocast" in text) == on_gpu
    assert "did not run: `RuntimeError: 0 active drivers`" in text
    assert "**2.00x**" in text and (f"**{0.25 if on_gpu else 1.5:.2f}x**" in text)
    chart = tmp_path / "vs_trl.png"
    compare.chart(summary, chart, meta)
    assert chart.stat().st_size > 10_000


def test_gpu_profile_prepares_a_qwen2_and_trains_it_in_bf16(tmp_path, monkeypatch):
    reason = workload.missing()
    if reason:
        pytest.skip(reason)
    # The profile's model at a tiny width and depth (its vocabulary, attention layout and ties kept).
    small = dict(workload.QWEN2_05B, hidden_size=28, intermediate_size=56, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    monkeypatch.setitem(workload.PROFILES, "gpu", dict(workload.PROFILES["gpu"], model=small))
    prep = workload.prepare(tmp_path / "prep", 2, "gpu")
    assert workload.profile_of(prep)["bf16"] is True
    config = json.loads((prep / "causal" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["vocab_size"] == 151936 and config["tie_word_embeddings"]
    assert not (prep / "reward").exists()  # the profile runs DPO only

    from benchmarks.peers import fastalign_probe
    from fastalign.engine.metrics import read_metrics

    trainer = fastalign_probe.build("fastalign", "dpo", prep, tmp_path / "run", 2)
    assert trainer.args.bf16 and trainer.args.max_steps == 2
    trainer.train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 2 and losses[0] == pytest.approx(0.6931, abs=1e-3)
    assert trainer.data_digest == workload.workload(prep, "dpo", 2)["digest"]
