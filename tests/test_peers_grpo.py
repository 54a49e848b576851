"""The GRPO end-to-end comparison with TRL (benchmarks/peers/grpo.py): its reward, its per-step
records from either trainer's logs and its table, without TRL (the runs are `make`-free:
`python -m benchmarks.peers.grpo`)."""

from benchmarks.peers import grpo


def test_reward_scores_sorted_places():
    assert grpo.sorted_reward(["3914="], ["1349"]) == [1.0]
    assert grpo.sorted_reward(["3914="], ["1394<eos>"]) == [0.5]
    assert grpo.sorted_reward(["21="], [""]) == [0.0]


def test_records_and_table():
    history = [{"loss": 0.1}, {"step_time": 2.0, "num_tokens": 100.0, "reward": 0.2},
               {"step_time": 1.0, "num_tokens": 180.0, "reward": 0.3}]
    assert grpo._records(None, history) == [{"seconds": 2.0, "tokens": 100.0, "reward": 0.2},
                                            {"seconds": 1.0, "tokens": 80.0, "reward": 0.3}]
    run = dict(median_seconds_per_step=1.0, tokens_per_step=80.0, built_rss_bytes=2**30)
    runs = [{"system": "fastalign", "tokens_per_s": 200.0, "peak_rss_bytes": 2**31, **run},
            {"system": "trl", "tokens_per_s": 100.0, "peak_rss_bytes": 2**32, **run}]
    text = grpo.table(runs)
    assert "| fastalign | 200 |" in text and "| TRL 1.16 | 100 |" in text
    assert "2.00x the tokens/s, 0.50x the peak RSS" in text
