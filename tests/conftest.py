"""Test set-up shared by the whole suite.

Off GPU the Triton kernels run under Triton's interpreter. Triton reads TRITON_INTERPRET when a
kernel is decorated, so it is set here, before any test module imports fastalign.kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
