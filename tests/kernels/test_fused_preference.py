"""fused_preference_loss against the naive path: full logits, log_softmax, gather, sums, loss.

Tolerance: fp32, 1e-5 relative to each tensor's scale (helpers.assert_close). bf16/fp16: the
lm_head matmuls run in the input dtype, against an fp32 reference on the same (rounded) inputs. As
for linear_logprobs (see its tests), each log-prob is off by up to EPS * max|z|, a sequence's sum
by its tokens times that (its scale grows alike), and the gradients carry that error and their own
roundings: rtol = 2 * EPS * (1 + max|z|) against each tensor's scale (seen: under 1 EPS).
"""

import importlib

import pytest
import torch

from fastalign.kernels.fused_preference import fused_preference_loss
from fastalign.kernels.preference import LOSS_TYPES, preference_loss
from helpers import DEVICE, EPS, assert_close

PATHS = ["torch", "triton"]
fp_module = importlib.import_module("fastalign.kernels.fused_preference")


def _device(path):
    return DEVICE if path in ("triton", "fused") else "cpu"


def _packed_batch(lengths, prompts, vocab, hidden_size, device):
    """One packed row; labels: the next token on completion positions, -100 elsewhere."""
    n = sum(lengths)
    tokens = torch.randint(0, vocab, (n,))
    labels = torch.full((n,), -100)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    for s, (start, length, prompt) in enumerate(zip(cu[:-1].tolist(), lengths, prompts)):
        for t in range(start + prompt - 1, start + length - 1):
            labels[t] = tokens[t + 1]
    hidden = torch.randn(n, hidden_size)
    weight = torch.randn(vocab, hidden_size) * hidden_size**-0.5 * 3
    bias = torch.randn(vocab) * 0.1
    return hidden.to(device), weight.to(device), bias.to(device), labels.to(device), cu.to(device)


def _naive(hidden, weight, bias, labels, cu, chosen, rejected, ref_c, ref_r, average, temperature, **kw):
    logits = hidden @ weight.t() + (0 if bias is None else bias)
    logq = torch.log_softmax(logits / temperature, -1)
    valid = labels != -100
    tok = torch.where(valid, logq.gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0], 0.0)
    bounds = cu.tolist()
    pis = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        total = tok[a:b].sum()
        pis.append(total / valid[a:b].sum().clamp(min=1) if average else total)
    pi = torch.stack(pis)
    losses, r_c, r_r = preference_loss(pi[chosen], pi[rejected], ref_c, ref_r, **kw)
    return losses.mean(), losses, r_c, r_r, pi[chosen], pi[rejected]


def _check(path, loss_type, average=False, reference_free=False, temperature=1.0, bias=True,
           dtype=torch.float32, **extra):
    device = _device(path)
    # 7 sequences: pairs (0, 3), (4, 1), (2, 6); sequence 5 is unpaired and must not count.
    lengths, prompts = [9, 14, 5, 11, 8, 6, 13], [3, 5, 2, 4, 1, 2, 6]
    hidden, weight, b, labels, cu = (t.to(dtype) if t.is_floating_point() else t
                                     for t in _packed_batch(lengths, prompts, 1037, 16, device))
    b = b if bias else None
    rtol = 1e-5
    if dtype != torch.float32:
        rtol = 2 * EPS[dtype] * (1 + (hidden.float() @ weight.float().t()).abs().max().item() / temperature)
    chosen, rejected = torch.tensor([0, 4, 2], device=device), torch.tensor([3, 1, 6], device=device)
    ref_c, ref_r = (None, None) if reference_free else (torch.randn(3, device=device) * 5 - 20, torch.randn(3, device=device) * 5 - 20)
    kw = dict(beta=0.2, loss_type=loss_type, reference_free=reference_free, label_smoothing=0.1 if loss_type != "exo_pair" else 0.0, **extra)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    refs = [t.detach().float().requires_grad_() for t in leaves]  # fp32 on the same values
    out = fused_preference_loss(
        leaves[0], leaves[1], labels, chosen, rejected, ref_c, ref_r, cu_seqlens=cu,
        bias=leaves[2] if bias else None, average_log_prob=average, temperature=temperature, backend=path, **kw,
    )
    expect = _naive(refs[0], refs[1], refs[2] if bias else None, labels, cu, chosen, rejected, ref_c, ref_r, average, temperature, **kw)
    for name, got, want in zip(out._fields, out, expect):
        assert_close(got, want, rtol, name)
    grads = torch.autograd.grad(out.loss * 3.0, leaves)  # an upstream factor, applied in backward
    grads_ref = torch.autograd.grad(expect[0] * 3.0, refs)
    for name, g, gr, leaf in zip(("hidden", "weight", "bias"), grads, grads_ref, leaves):
        assert g.dtype == leaf.dtype, f"grad {name} is {g.dtype}, its input {leaf.dtype}"
        assert_close(g, gr, rtol, f"grad {name}")
    return out, grads, labels, cu


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("path", PATHS)
def test_every_loss_type_matches_the_naive_path(path, loss_type):
    _check(path, loss_type, bco_delta=0.05) if loss_type == "bco_pair" else _check(path, loss_type)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "kto_pair"])
def test_the_fused_lm_head_gives_the_same_loss_and_gradients(loss_type):
    _check("fused", loss_type)
    _check("fused", loss_type, average=True, reference_free=True, temperature=0.7, bias=False)


@pytest.mark.parametrize("path", PATHS)
def test_average_reference_free_temperature_no_bias(path):
    for loss_type in ("sigmoid", "ipo", "kto_pair"):
        _check(path, loss_type, average=True, reference_free=True, temperature=0.7, bias=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS)
def test_low_precision_matches_the_fp32_path(path, dtype, monkeypatch):
    monkeypatch.setattr(fp_module, "WEIGHT_GRAD_BLOCK", 300)  # 1037 = 3 x 300 + 137: four blocks
    for loss_type in ("sigmoid", "ipo", "kto_pair"):
        _check(path, loss_type, dtype=dtype)
    _check(path, "sigmoid", dtype=dtype, average=True, temperature=0.7, bias=False)


@pytest.mark.parametrize("path", PATHS)
def test_one_pair_per_chunk(path, monkeypatch):
    monkeypatch.setattr(fp_module, "CHUNK_BYTES", 4 * 1037 * 10)  # 10 rows: every pair is its own chunk
    for loss_type in ("sigmoid", "hinge"):
        _check(path, loss_type, average=True)


def test_a_fully_masked_completion_gives_no_nan():
    hidden, weight, bias, labels, cu = _packed_batch([6, 6], [2, 2], 50, 8, "cpu")
    labels[6:] = -100  # truncation emptied the rejected completion
    hidden.requires_grad_()
    for loss_type in ("ipo", "sigmoid"):
        out = fused_preference_loss(
            hidden, weight, labels, torch.tensor([0]), torch.tensor([1]), torch.tensor([-3.0]), torch.tensor([0.0]),
            cu_seqlens=cu, loss_type=loss_type, average_log_prob=True,
        )
        assert out.rejected_logps.item() == 0.0
        (g,) = torch.autograd.grad(out.loss, hidden)
        assert torch.isfinite(out.loss) and torch.isfinite(g).all()
        assert (g[6:] == 0).all()


def test_bad_pairs_and_inputs():
    hidden, weight, bias, labels, cu = _packed_batch([4, 5, 3], [1, 1, 1], 30, 8, "cpu")
    ref = torch.zeros(1)
    call = lambda c, r, **kw: fused_preference_loss(hidden, weight, labels, torch.tensor(c), torch.tensor(r), ref, ref, cu_seqlens=cu, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"rejected\[0\] = 3 is not a sequence index in \[0, 3\)"):
        call([0], [3])
    with pytest.raises(ValueError, match="more than one pair"):
        call([0], [0])
    with pytest.raises(ValueError, match="unknown loss_type"):
        call([0], [1], loss_type="dpo")
    with pytest.raises(ValueError, match=r"reference_chosen_logps must be \[P\] = \[1\]"):
        fused_preference_loss(hidden, weight, labels, torch.tensor([0]), torch.tensor([1]), torch.zeros(2), ref, cu_seqlens=cu)
    with pytest.raises(ValueError, match="must be \\[N\\]"):
        fused_preference_loss(hidden, weight, labels[:3], torch.tensor([0]), torch.tensor([1]), ref, ref, cu_seqlens=cu)
