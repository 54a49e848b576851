"""segment_sum / segment_mean over the packed layout: every path against the loop reference."""

import pytest
import torch

from fastalign.kernels.segments import segment_mean, segment_sum, segment_sum_reference
from helpers import DEVICE, assert_close

PATHS = ["torch", "triton"]


def _device(path):
    return DEVICE if path == "triton" else "cpu"


def _layout(lengths, device):
    lengths = torch.tensor(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    seq_index = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return cu.to(device), seq_index.to(device)


# One token; one sequence; an empty sequence in the middle; 1037 tokens in uneven sequences.
LAYOUTS = [[1], [7], [3, 0, 5], [400, 1, 36, 600]]


@pytest.mark.parametrize("lengths", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_segment_sum_matches_reference(path, lengths):
    device = _device(path)
    cu, seq_index = _layout(lengths, device)
    values = torch.randn(sum(lengths), device=device, requires_grad=True)
    ref = segment_sum_reference(values, cu_seqlens=cu)
    g = torch.randn_like(ref)
    (grad_ref,) = torch.autograd.grad(ref, values, g)
    for layout in ({"cu_seqlens": cu}, {"seq_index": seq_index}):
        out = segment_sum(values, backend=path, **layout)
        if "seq_index" in layout and lengths[-1] == 0:
            continue  # a trailing empty sequence cannot be seen from seq_index
        assert out.shape == (len(lengths),) and out.dtype == torch.float32
        assert_close(out, ref, 1e-5, "segment sum")
        (grad,) = torch.autograd.grad(out, values, g)
        assert_close(grad, grad_ref, 1e-6, "grad")


@pytest.mark.parametrize("path", PATHS)
def test_segment_sum_bf16_accumulates_in_fp32(path):
    device = _device(path)
    cu, _ = _layout([2000, 3], device)
    values = torch.full((2003,), 1.0, device=device, dtype=torch.bfloat16)
    # 2000 ones: a bf16 accumulator would stall at 256.
    assert segment_sum(values, cu_seqlens=cu, backend=path).tolist() == [2000.0, 3.0]


@pytest.mark.parametrize("path", PATHS)
def test_segment_mean_with_mask_holes_and_an_empty_completion(path):
    device = _device(path)
    cu, seq_index = _layout([4, 3, 5], device)
    values = torch.arange(12.0, device=device, requires_grad=True)
    # Sequence 0 averages tokens 1 and 3; sequence 1 has no loss token at all; sequence 2 has all.
    mask = torch.tensor([0, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1], device=device, dtype=torch.bool)
    out = segment_mean(values, seq_index=seq_index, mask=mask, backend=path)
    assert out.tolist() == [(1 + 3) / 2, 0.0, (7 + 8 + 9 + 10 + 11) / 5]
    (grad,) = torch.autograd.grad(out.sum(), values)
    assert_close(grad, torch.tensor([0, 0.5, 0, 0.5, 0, 0, 0, 0.2, 0.2, 0.2, 0.2, 0.2]), 1e-6)
    plain = segment_mean(values, cu_seqlens=cu, backend=path)
    assert_close(plain, torch.tensor([1.5, 5.0, 9.0]), 1e-6)


def test_segment_layout_errors():
    values = torch.randn(5)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="exactly one of"):
        segment_sum(values)
    with pytest.raises(ValueError, match="exactly one of"):
        segment_sum(values, seq_index=torch.zeros(5, dtype=torch.long), cu_seqlens=cu)
    with pytest.raises(ValueError, match="must run from 0 to N=5"):
        segment_sum(values, cu_seqlens=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match=r"cu_seqlens\[2\] < cu_seqlens\[1\]"):
        segment_sum(values, cu_seqlens=torch.tensor([0, 4, 3, 5]))
    with pytest.raises(ValueError, match=r"seq_index\[3\] < seq_index\[2\]"):
        segment_sum(values, seq_index=torch.tensor([0, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="must match values"):
        segment_sum(values, seq_index=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="one packed row"):
        segment_sum(values.view(1, 5), cu_seqlens=cu)
    with pytest.raises(ValueError, match="mask"):
        segment_mean(values, cu_seqlens=cu, mask=torch.ones(4))
