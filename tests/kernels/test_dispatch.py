"""Which path an op takes: by device, by FASTALIGN_KERNELS, by an explicit backend."""

import pytest
import torch

import fastalign.kernels as K
from fastalign.kernels import _dispatch


def test_default_path_follows_the_device(monkeypatch):
    monkeypatch.delenv("FASTALIGN_KERNELS", raising=False)
    assert K.resolve_backend(torch.device("cpu")) == "torch"
    assert K.resolve_backend(torch.device("cuda", 0)) == "triton"


def test_environment_forces_a_path_and_argument_wins(monkeypatch):
    monkeypatch.setenv("FASTALIGN_KERNELS", "reference")
    assert K.resolve_backend(torch.device("cpu")) == "reference"
    assert K.resolve_backend(torch.device("cpu"), "torch") == "torch"
    monkeypatch.setenv("FASTALIGN_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="FASTALIGN_KERNELS='cuda-magic' is not a kernel path"):
        K.resolve_backend(torch.device("cpu"))
    with pytest.raises(ValueError, match="backend='fast'"):
        K.resolve_backend(torch.device("cpu"), "fast")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRETER", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.resolve_backend(torch.device("cpu"), "triton")
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRETER", True)
    assert K.resolve_backend(torch.device("cpu"), "triton") == "triton"


def test_forced_reference_runs_the_reference(monkeypatch):
    logits = torch.randn(4, 9, requires_grad=True)
    labels = torch.randint(0, 9, (4,))
    monkeypatch.setenv("FASTALIGN_KERNELS", "reference")
    out = K.selective_logprobs(logits, labels)
    assert out.grad_fn is not None and "Function" not in type(out.grad_fn).__name__
    monkeypatch.setenv("FASTALIGN_KERNELS", "torch")
    out = K.selective_logprobs(logits, labels)
    assert "SelectiveLogprobs" in type(out.grad_fn).__name__
