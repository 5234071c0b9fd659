"""The one GPU timing helper: CUDA-graph replays, warm-up, medians, inputs rotated past L2, copy bandwidth.

Typical use::

    copies = rotation_count(bytes_per_call, device)            # enough to spill L2
    calls = [functools.partial(fn, inputs[i]) for i in range(copies)]
    t = time_calls(calls)                                      # median µs per call
    bw = copy_bandwidth(device)                                # bytes read + written per s

:func:`time_calls` captures one CUDA graph that runs every callable once (so
consecutive calls touch different memory, as successive layers of a model
do), replays it after a warm-up, and reports the median replay time divided
by the number of calls. Without CUDA graphs (``graph=False``, or when capture
fails) it times eager launches with CUDA events the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call time in microseconds: median and the 20th/80th percentiles of the replays."""

    median_us: float
    p20_us: float
    p80_us: float
    replays: int
    graph: bool


def l2_bytes(device: torch.device | str | None = None) -> int:
    """The device's L2 cache size in bytes (50 MB on an H100, 60 MB on an H200)."""
    props = torch.cuda.get_device_properties(torch.device(device or "cuda"))
    return int(getattr(props, "L2_cache_size", 0) or 64 << 20)


def rotation_count(bytes_per_call: int, device: torch.device | str | None = None, minimum: int = 2,
                   maximum: int = 64) -> int:
    """Copies of the inputs to cycle through so that each call's data was evicted from L2 since its last use."""
    needed = -(-3 * l2_bytes(device) // max(1, bytes_per_call)) + 1
    return max(minimum, min(maximum, needed))


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _event_times(run: Callable[[], None], replays: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for start, end in zip(starts, ends):
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def time_calls(
    calls: Sequence[Callable[[], object]],
    replays: int = 50,
    warmup: int = 5,
    graph: bool = True,
) -> Timing:
    """Median microseconds per call of ``calls`` run back to back (one CUDA graph of all of them).

    Each replay runs every callable once; the reported time is the replay time
    over ``len(calls)``. Warm-up (compilation, autotuning, allocator) happens
    before capture, on a side stream as CUDA graphs require.
    """
    if not calls:
        raise ValueError("calls must hold at least one callable; got an empty sequence")

    def run_all() -> None:
        for call in calls:
            call()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(1, warmup // 2)):
            run_all()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    used_graph = False
    runner: Callable[[], None] = run_all
    if graph:
        try:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                run_all()
            runner = cuda_graph.replay
            used_graph = True
        except RuntimeError as err:  # capture can fail for ops that sync; fall back to eager launches
            logger.warning("CUDA graph capture failed (%s); timing eager launches", err)
            torch.cuda.synchronize()
    for _ in range(warmup):
        runner()
    torch.cuda.synchronize()
    times = [t / len(calls) for t in _event_times(runner, replays)]
    return Timing(statistics.median(times), _percentile(times, 0.2), _percentile(times, 0.8), replays, used_graph)


def copy_bandwidth(device: torch.device | str | None = None, nbytes: int = 1 << 30, replays: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    device = torch.device(device or "cuda")
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    timing = time_calls([lambda: dst.copy_(src)], replays=replays, warmup=3, graph=False)
    return 2 * nbytes / (timing.median_us * 1e-6)


def device_name(device: torch.device | str | None = None) -> str:
    return torch.cuda.get_device_name(torch.device(device or "cuda"))
