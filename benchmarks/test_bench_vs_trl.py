"""fastalign against TRL, end to end and quick: 3 steps of DPO, reward modeling and SFT each.

The full comparison (interleaved rounds, the tables and the chart) is ``make bench-peers``
(``python -m benchmarks.peers``, see ``benchmarks/peers/compare.py``). This test runs its quick
form under ``make bench``: each system in a fresh process on the same weights and token ids, and
checks what must hold however loaded the machine is: both trained on identical tokens, and the
losses and gradient norms of every step agree (the math is the same; fastalign computes no pad
token). The speed-up and memory ratio are printed, not asserted (3 steps on a shared CPU).

Skips, with the reason, where ``../shared/data`` is absent or the peer venv (TRL) is not there.
"""

from __future__ import annotations

import pytest

from benchmarks.peers.compare import OUT, PEER_PYTHON, peer_python, run_probe
from benchmarks.peers.workload import ALGOS, missing, prepare

STEPS = 3


def _skip_reason() -> str | None:
    if missing():
        return missing()
    if peer_python() is None:
        return f"no peer venv at {PEER_PYTHON}: `make bench-peers` creates it (TRL, liger-kernel)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(scope="module")
def prep():
    return prepare(OUT / "prep", STEPS)


@pytest.mark.parametrize("algo", ALGOS)
def test_same_losses_as_trl(algo, prep, tmp_path, capsys):
    mine = run_probe("fastalign", algo, prep, STEPS, peer_python(), tmp_path / "fastalign")
    peer = run_probe("trl", algo, prep, STEPS, peer_python(), tmp_path / "trl")
    assert "error" not in mine, mine.get("error")
    assert "error" not in peer, peer.get("error")
    assert mine["data_digest"] == peer["data_digest"], "the two systems trained on different token ids"
    assert mine["real_tokens"] == peer["real_tokens"]
    assert mine["losses"] == pytest.approx(peer["losses"], rel=1e-3, abs=1e-4)
    assert mine["grad_norms"] == pytest.approx(peer["grad_norms"], rel=1e-3)
    with capsys.disabled():
        print(f"\n{algo}: fastalign {mine['tokens_per_s']:.0f} real tokens/s, peak RSS "
              f"{mine['peak_rss_bytes'] / 2**30:.2f} GiB; TRL {peer['tokens_per_s']:.0f} tokens/s, "
              f"{peer['peak_rss_bytes'] / 2**30:.2f} GiB ({peer['pad_share']:.0%} pad): "
              f"{mine['tokens_per_s'] / peer['tokens_per_s']:.2f}x the throughput, "
              f"{mine['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f}x the memory; "
              f"losses {[round(x, 4) for x in mine['losses']]}")
