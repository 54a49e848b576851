"""selective_logprobs and entropy_from_logits: every path against the fp32 reference.

Tolerances. The forward pass upcasts its input to fp32 exactly, as the reference does, so values
match within 1e-5 for every input dtype. Gradients are returned in the input's dtype; both the op
and the reference round the same fp32 gradient to it, so they may differ by one unit in the last
place: rtol = EPS[dtype] (1e-5 for fp32).
"""

import pytest
import torch

from fastalign.kernels import (
    entropy_from_logits,
    entropy_from_logits_reference,
    selective_logprobs,
    selective_logprobs_reference,
)
from helpers import DEVICE, EPS, assert_close

PATHS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, vocabulary): one token; 3-D; vocabularies that are no multiple of the tile.
SHAPES = [((1,), 7), ((3, 5), 1037), ((4,), 32003), ((2,), 128256)]


def _device(path):
    return DEVICE if path == "triton" else "cpu"


def _grad_rtol(dtype):
    return max(EPS[dtype], 1e-5)


def _check_selective(path, logits, labels, temperature=1.0, exact=False, **kw):
    """Against the fp32 reference, or with ``exact`` against the same formula in float64."""
    x = logits.detach().clone().requires_grad_()
    xr = logits.detach().clone().requires_grad_()
    out = selective_logprobs(x, labels, temperature=temperature, backend=path, **kw)
    if exact:
        logp64 = torch.log_softmax(xr.double() / temperature, dim=-1)
        valid = labels != -100
        ref = torch.where(valid, logp64.gather(-1, torch.where(valid, labels, 0)[..., None])[..., 0], 0.0)
    else:
        ref = selective_logprobs_reference(xr, labels, temperature=temperature)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert_close(out, ref, 1e-5, "logprobs")
    g = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(out, x, g)
    (grad_ref,) = torch.autograd.grad(ref, xr, g)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert_close(grad, grad_ref, _grad_rtol(logits.dtype), "grad logits")
    return out, grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("lead,vocab", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_selective_matches_reference(path, dtype, lead, vocab, temperature):
    device = _device(path)
    logits = (torch.randn(*lead, vocab) * 4).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, lead, device=device)
    labels.view(-1)[0] = -100  # one ignored position in every case
    _check_selective(path, logits, labels, temperature)


@pytest.mark.parametrize("path", PATHS)
def test_selective_all_ignored_rows_give_zero_and_no_gradient(path):
    device = _device(path)
    logits = torch.randn(3, 4, 1037, device=device)
    labels = torch.full((3, 4), -100, device=device)
    labels[1, 2] = 5  # one row with a label: the others must stay exactly zero
    out, grad = _check_selective(path, logits, labels)
    mask = labels == -100
    assert (out[mask] == 0).all()
    assert (grad[mask] == 0).all()
    assert grad[1, 2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_selective_extreme_logits(path, dtype):
    device = _device(path)
    vocab = 1037
    spread = torch.where(torch.rand(4, vocab) < 0.5, -1e4, 1e4) + torch.randn(4, vocab)
    offset = 1e4 + torch.randn(4, vocab)  # close values riding on a large offset: no slack in fp32
    logits = torch.cat([spread, offset, -offset]).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (12,), device=device)
    for temperature in (1.0, 0.3, 3.0):
        # The fp32 reference rounds x / T to fp32 first: at |x| / T ~ 3e4 that moves p by 2e-4 of
        # the gradient's scale. The torch path rounds the same way and matches it; the Triton path
        # computes (x - max x) / T, exact near the max, and is checked against float64.
        out, _ = _check_selective(path, logits, labels, temperature, exact=path == "triton")
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("path", PATHS)
def test_selective_strided_input_and_many_chunks(path):
    device = _device(path)
    full = torch.randn(2, 9, 515, device=device)
    logits = full[:, :-1, :]  # the usual shift: not contiguous, not viewable as 2-D
    labels = torch.randint(0, 515, (2, 8), device=device)
    _check_selective(path, logits, labels, chunk_size=3)


@pytest.mark.parametrize("lead,vocab", [((1,), 7), ((3, 5), 1037), ((2,), 32003)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_entropy_matches_reference(path, dtype, lead, vocab):
    device = _device(path)
    logits = (torch.randn(*lead, vocab) * 3).to(device=device, dtype=dtype)
    x = logits.clone().requires_grad_()
    xr = logits.clone().requires_grad_()
    ent = entropy_from_logits(x, backend=path, chunk_size=2)
    ref = entropy_from_logits_reference(xr)
    assert ent.dtype == torch.float32 and ent.shape == lead
    assert_close(ent, ref, 1e-5, "entropy")
    g = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(ent, x, g)
    (grad_ref,) = torch.autograd.grad(ref, xr, g)
    assert_close(grad, grad_ref, _grad_rtol(dtype), "grad entropy")


@pytest.mark.parametrize("path", PATHS)
def test_entropy_extreme_logits(path):
    device = _device(path)
    logits = torch.cat([1e4 + torch.randn(3, 1037), torch.full((1, 1037), -1e4)]).to(device)
    ent = entropy_from_logits(logits, backend=path)
    assert_close(ent, entropy_from_logits_reference(logits), 1e-5, "entropy")
    assert ent[3].item() == pytest.approx(torch.log(torch.tensor(1037.0)).item(), rel=1e-6)


def test_bad_labels_name_the_position():
    logits = torch.randn(2, 3, 11)
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 2] = 11
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 11 is not a vocabulary id in \[0, 11\)"):
        selective_logprobs(logits, labels)
    labels[1, 2] = -5
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = -5"):
        selective_logprobs(logits, labels)
    with pytest.raises(ValueError, match="must match logits"):
        selective_logprobs(logits, labels[:, :2])
    with pytest.raises(TypeError, match="integer"):
        selective_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        selective_logprobs(logits, labels.clamp(0, 10), temperature=0.0)


def test_custom_ignore_index():
    logits = torch.randn(6, 50)
    labels = torch.randint(0, 50, (6,))
    labels[2] = 0
    out = selective_logprobs(logits, labels, ignore_index=0)
    assert out[2] == 0
    assert_close(out, selective_logprobs_reference(logits, labels, ignore_index=0), 1e-5)
