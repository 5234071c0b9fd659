"""Shared fixtures; GPU and slow tests are opt-in through markers."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests without CUDA, with a reason, rather than failing them."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine with -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(int(os.environ.get("CODEGEMM_TEST_SEED", "0")))


# Triton kernels run on the CPU through the interpreter; it must be chosen
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
