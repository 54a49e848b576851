"""The kernel benchmarks compare like for like: every path of a case computes the same values and
gradients as the naive path (small shapes of each op, fp32 and bf16)."""

import pytest
import torch

from benchmarks.cases import PATHS, Case, make_inputs, runner, unavailable

CASES = [
    Case("linear_logprobs", 37, 24, 301, "fp32"),
    Case("linear_logprobs", 37, 24, 301, "bf16"),
    Case("selective_logprobs", 37, 0, 301, "fp32"),
    Case("selective_logprobs", 37, 0, 301, "bf16"),
    Case("fused_preference_loss", 16 * 12, 24, 301, "fp32"),
    Case("fused_preference_loss", 16 * 12, 24, 301, "bf16"),
]
# Liger's DPO loss is given no reference log-probs (its reference work is not timed), so its value
# differs by design; the lm_head-matmuls path is a floor, not the same computation.
COMPARED = ["fastalign torch", "trl chunked"]


def _gradients(case: Case, path: str) -> dict[str, torch.Tensor]:
    """The gradients one run of ``path`` computes for its inputs (the runner then drops them)."""
    inputs = make_inputs(case, "cpu", seed=3)
    grads = {}
    for name in ("hidden", "weight", "logits"):
        if name in inputs:
            inputs[name].register_hook(lambda g, name=name: grads.__setitem__(name, g.float().clone()))
    runner(case, path)(inputs)
    return grads


@pytest.mark.parametrize("path", COMPARED)
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_path_matches_naive(case, path):
    if path not in PATHS[case.op]:
        pytest.skip(f"{path} is not a path of {case.op}")
    reason = unavailable(path, "cpu", case)
    if reason:
        pytest.skip(reason)
    expected, got = _gradients(case, "naive"), _gradients(case, path)
    assert got.keys() == expected.keys() and expected
    tol = 2e-2 if case.dtype == "bf16" else 1e-4
    for name, e in expected.items():
        assert e.abs().max() > 0
        torch.testing.assert_close(got[name], e, rtol=tol, atol=tol * e.abs().max().item())
