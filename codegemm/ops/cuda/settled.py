"""Whether a layer's tables may be read before the kernel ahead of its matmul has finished.

The CUDA matmuls are launched as programmatic dependents (``launch_dependent`` in common.cuh): their blocks start
while the kernel ahead of them on the stream (usually the previous layer's split-K reduce) drains, and wait for it
before reading activations. Loading the weights before that wait hides their latency too (8B decoder block on an
H200: 35.2 -> 33.7 µs at one token; docs/KERNELS.md, v18), but is only safe where that kernel cannot have written
them. We promise it only inside a CUDA graph being captured (decode steps, benchmarks: the kernels ahead are the
graph's own) and only for tables no PyTorch op wrote since their previous matmul. Anything else (eager calls, a
first call, a table written in place since, inference tensors that keep no version) waits first, as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

_versions: dict[int, tuple[weakref.ref, int]] = {}
"""By ``id``: each table (weakly) and its version counter at its last matmul (bumped by every in-place write, views
included). Keyed by id because tensors compare elementwise, which a WeakKeyDictionary lookup would call."""


def _version(table: torch.Tensor) -> int | None:
    try:
        return table._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def tables_settled(tables: Iterable[torch.Tensor]) -> bool:
    """True when the stream is being captured into a CUDA graph and none of ``tables`` changed since its last
    call here; records the tables' versions either way."""
    settled = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    for table in tables:
        version = _version(table)
        seen = _versions.get(id(table))
        if version is None or seen is None or seen[0]() is not table or seen[1] != version:
            settled = False
            if version is not None:
                key = id(table)
                _versions[key] = (weakref.ref(table, lambda _, key=key: _versions.pop(key, None)), version)
    return settled
