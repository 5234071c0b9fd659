"""Bit-reproducible quantization on CPU.

The learned codebooks are trained through a codebook lookup, whose backward is
``index_put_(accumulate=True)``. On a multithreaded CPU that sums the gradient rows
of one centroid in a thread-dependent order, so two runs of the same quantization
in one process gave different codebooks and scales (2 threads; with 1 thread they
matched), and end-to-end perplexities differed by ~2% between runs. PyTorch's
deterministic mode routes the sum through an ordered (sorted) path.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """Turn on PyTorch's deterministic algorithms (warn-only) while quantizing on the CPU; restore after.

    GPUs are left alone: deterministic mode there also needs ``CUBLAS_WORKSPACE_CONFIG`` set before CUDA
    starts, and the sorted accumulation has not been timed on a GPU.
    """
    if device.type != "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def reproducible_on_cpu(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn(model, ...)`` under :func:`deterministic_on_cpu` for the model's device."""

    @functools.wraps(fn)
    def wrapper(model: torch.nn.Module, *args: Any, **kwargs: Any) -> T:
        first = next(model.parameters(), None)
        with deterministic_on_cpu(first.device if first is not None else torch.device("cpu")):
            return fn(model, *args, **kwargs)

    return wrapper
