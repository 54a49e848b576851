"""linear_logprobs, the fused lm_head: every path against the fp32 reference, values and gradients.

Tolerances. fp32: 1e-5 relative (against each tensor's largest entry, see helpers.assert_close).
bf16/fp16: the op runs the lm_head matmul in the input dtype, as a bf16 model does, so each logit
is rounded to it (half an ulp: EPS/2 * |z|) where the reference keeps fp32 logits. A log-prob
z_y - lse inherits at most the rounding of z_y plus that of the largest logits: EPS * max|z|.
The logits' gradient carries that error through p = exp(log p) (relative EPS * max|z|) plus its own
rounding to the dtype before the gradient matmuls (EPS/2), and those matmuls round once more:
rtol = 2 * EPS * (1 + max|z|) against the gradient's scale.
"""

import importlib

import pytest
import torch

from fastalign.kernels import linear_logprobs, linear_logprobs_reference
from helpers import DEVICE, EPS, assert_close

PATHS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (tokens, hidden, vocabulary): one token; vocabularies that are no multiple of the tile.
SHAPES = [(1, 8, 7), (13, 16, 1037), (5, 8, 32003), (3, 8, 128256)]


def _device(path):
    return DEVICE if path == "triton" else "cpu"


def _inputs(n, h, v, dtype, device, bias=True, scale=3.0):
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h) * (scale / h**0.5)
    b = torch.randn(v) if bias else None
    labels = torch.randint(0, v, (n,))
    labels[n // 2] = -100
    to = dict(device=device, dtype=dtype)
    return hidden.to(**to), weight.to(**to), None if b is None else b.to(**to), labels.to(device)


def _check(path, hidden, weight, bias, labels, temperature=1.0, entropy=False, chunk_size=None):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    b, br = (leaves[2], refs[2]) if bias is not None else (None, None)
    kw = dict(temperature=temperature, return_entropy=entropy)
    out = linear_logprobs(leaves[0], leaves[1], labels, b, backend=path, chunk_size=chunk_size, **kw)
    ref = linear_logprobs_reference(refs[0], refs[1], labels, br, **kw)
    out, ref = (out, ref) if entropy else ((out,), (ref,))

    dtype = hidden.dtype
    with torch.no_grad():
        z = refs[0].float() @ refs[1].float().t() + (0 if br is None else br.float())
        zmax = (z / temperature).abs().max().item()
    for name, o, r in zip(("logprobs", "entropy"), out, ref):
        assert o.dtype == torch.float32 and o.shape == labels.shape
        if dtype == torch.float32:
            assert_close(o, r, 1e-5, name)
        else:
            torch.testing.assert_close(o.detach(), r.detach(), rtol=0, atol=EPS[dtype] * zmax)

    gs = [torch.randn_like(r) for r in ref]
    grads = torch.autograd.grad(sum((o * g).sum() for o, g in zip(out, gs)), leaves)
    grads_ref = torch.autograd.grad(sum((r * g).sum() for r, g in zip(ref, gs)), refs)
    rtol = 1e-5 if dtype == torch.float32 else 2 * EPS[dtype] * (1 + zmax)
    for name, g, gr in zip(("hidden", "weight", "bias"), grads, grads_ref):
        assert g.dtype == dtype and g.shape == gr.shape
        assert_close(g, gr, rtol, f"grad {name}")
    return out, grads


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_linear_matches_reference(path, dtype, n, h, v):
    hidden, weight, bias, labels = _inputs(n, h, v, dtype, _device(path))
    _check(path, hidden, weight, bias, labels, chunk_size=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_linear_entropy_temperature_no_bias(path, dtype):
    hidden, weight, _, labels = _inputs(11, 16, 1037, dtype, _device(path), bias=False)
    for temperature in (1.0, 0.6, 2.5):
        _check(path, hidden, weight, None, labels, temperature=temperature, entropy=True, chunk_size=3)


@pytest.mark.parametrize("path", PATHS)
def test_linear_entropy_large_vocabulary(path):
    hidden, weight, bias, labels = _inputs(3, 8, 128256, torch.float32, _device(path))
    _check(path, hidden, weight, bias, labels, entropy=True)


@pytest.mark.parametrize("path", PATHS)
def test_linear_all_ignored_gives_zero_and_no_gradient(path):
    hidden, weight, bias, labels = _inputs(7, 16, 1037, torch.float32, _device(path))
    labels[:] = -100
    (out, ent), grads = _check(path, hidden, weight, bias, labels, entropy=True, chunk_size=2)
    assert (out == 0).all() and (ent == 0).all()
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("path", PATHS)
def test_linear_extreme_logits(path):
    # hidden and weight scaled so that logits reach about +-1e4.
    hidden, weight, bias, labels = _inputs(9, 16, 1037, torch.float32, _device(path), scale=3000.0)
    (out,), _ = _check(path, hidden, weight, bias, labels, chunk_size=4)
    assert torch.isfinite(out).all() and out.abs().max() > 1e3


@pytest.mark.parametrize("path", PATHS)
def test_linear_frozen_weight_and_leading_dims(path):
    device = _device(path)
    hidden = torch.randn(2, 5, 16, device=device, requires_grad=True)
    weight = torch.randn(300, 16, device=device)  # frozen lm_head (LoRA): no weight gradient
    labels = torch.randint(0, 300, (2, 5), device=device)
    out = linear_logprobs(hidden, weight, labels, backend=path, chunk_size=3)
    ref = linear_logprobs_reference(hidden, weight, labels)
    assert out.shape == (2, 5)
    assert_close(out, ref, 1e-5)
    (g,) = torch.autograd.grad(out.sum(), hidden)
    (gr,) = torch.autograd.grad(ref.sum(), hidden)
    assert_close(g, gr, 1e-5)


def test_linear_chunking_does_not_change_the_result():
    hidden, weight, bias, labels = _inputs(17, 16, 1037, torch.float32, "cpu")
    whole = linear_logprobs(hidden, weight, labels, bias, chunk_size=17)
    for chunk in (1, 4, 16):
        assert_close(linear_logprobs(hidden, weight, labels, bias, chunk_size=chunk), whole, 1e-6)


def test_linear_bad_inputs():
    hidden, weight, bias, labels = _inputs(4, 8, 50, torch.float32, "cpu")
    bad = labels.clone()
    bad[3] = 50
    with pytest.raises(ValueError, match=r"labels\[3\] = 50 is not a vocabulary id in \[0, 50\)"):
        linear_logprobs(hidden, weight, bad)
    with pytest.raises(ValueError, match=r"must be \[\.\.\., H\] and \[V, H\]"):
        linear_logprobs(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="must match hidden"):
        linear_logprobs(hidden, weight, labels[:2])
    with pytest.raises(TypeError, match="share a dtype"):
        linear_logprobs(hidden.double(), weight, labels)
    with pytest.raises(ValueError, match=r"bias \(49,\) must be \[V\]"):
        linear_logprobs(hidden, weight, labels, bias[:49])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_logprobs(hidden, weight, labels, chunk_size=0)


@pytest.mark.parametrize("path", PATHS)
def test_linear_backward_over_many_vocabulary_tiles(path, monkeypatch):
    mod = importlib.import_module("fastalign.kernels.linear_logprobs")  # the module, not the op
    n, v = 10, 1037
    monkeypatch.setattr(mod, "CHUNK_BYTES", 4 * n * 100)  # backward tiles of 128 columns, the least
    hidden, weight, bias, labels = _inputs(n, 16, v, torch.float32, _device(path))
    labels[1:6] = torch.tensor([127, 128, 255, 1023, 1036])  # labels on both sides of tile edges
    _check(path, hidden, weight, bias, labels, temperature=0.8, entropy=True, chunk_size=3)
    for dtype in (torch.bfloat16, torch.float16):
        _check(path, hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, entropy=True, chunk_size=3)
