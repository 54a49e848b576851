"""GAE at a PPO batch (256 rows x 1024 steps, fp32): the per-step loop against the scan paths.

Paths: ``reference`` (the per-step Python loop, as TRL 0.7.10 runs it), ``fastalign torch`` (the
blocked discount-matrix scan) and ``fastalign triton`` (CUDA only). Time: pytest-benchmark, in this
process, for the unwhitened advantages of a batch with left padding and holes in its mask.

Peak extra memory is recorded as 0: GAE's temporaries are a few ``[B, T]`` fp32 buffers (1 MiB
each at this shape), far below what the fresh-process RSS probe of the log-prob benchmarks can
resolve, so it is not measured here.
"""

import pytest
import torch

from fastalign.kernels.gae import gae

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T = 256, 1024
GAMMA, LAM = 1.0, 0.95
PATHS = ["reference", "fastalign torch", "fastalign triton"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    values, rewards = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.05).float()
    left = torch.randint(0, T // 2, (B,), generator=g)
    mask[torch.arange(T)[None, :] < left[:, None]] = 0  # left padding: prompts of varying length
    return values.to(DEVICE), rewards.to(DEVICE), mask.to(DEVICE)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("path", PATHS)
def test_gae(benchmark, path):
    if path == "fastalign triton" and DEVICE != "cuda":
        pytest.skip("the triton path runs natively only on CUDA (interpreted it measures nothing useful)")
    benchmark.group = f"gae B={B} T={T} fp32"
    benchmark.extra_info.update(
        op="gae", n=B * T, h=0, v=T, dtype="fp32", path=path, device=DEVICE,
        peak_extra_bytes=0,  # not measured, see the module docstring
    )
    values, rewards, mask = _inputs()
    backend = path.split()[-1]

    def step():
        gae(values, rewards, mask, GAMMA, LAM, backend=backend)
        _sync()

    loop = path == "reference"
    benchmark.pedantic(step, rounds=5 if loop else 20, warmup_rounds=1, iterations=1)
