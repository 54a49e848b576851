"""Training or evaluation mode for a block of code: the model's mode is set on entry and restored
on exit, whatever the block raises."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def mode(model: torch.nn.Module, training: bool) -> Iterator[torch.nn.Module]:
    """``model`` in training (``training=True``) or evaluation mode inside the block."""
    was = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was)


def eval_mode(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """``model`` in evaluation mode (no dropout) inside the block, its own mode after it."""
    return mode(model, False)


def train_mode(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """``model`` in training mode inside the block, its own mode after it."""
    return mode(model, True)
