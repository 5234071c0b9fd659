"""Where a decode step's time goes: GPU kernel time by category over replayed steps, and the gaps between.

Kernels are grouped by name (quantized matmuls, dense matmuls, attention,
fused norm/rotary/elementwise code, KV-cache writes, argmax/sampling). The
step time measured with CUDA events minus the summed kernel time is the time
the GPU sat idle between kernels (launch gaps inside the graph, host waits).
Kernels launched as programmatic dependents (the CUDA matmuls and their split-K
reduces, docs/KERNELS.md v18) start before the kernel ahead of them ends and
wait on chip, so their durations include that wait and the sum can exceed the
step: the excess is reported as ``overlap_us`` (and the gap as zero).
"""

from __future__ import annotations

import re

import torch

from codegemm.generation import FastGenerator

CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("fused_elementwise_norm_rope", re.compile(r"^triton_(poi|red|per)_")),  # inductor's fused kernels
    ("matmul_quantized", re.compile(r"psumbook|dequant|codebook|code\dx\d+|codekx|aqlm|split_reduce", re.IGNORECASE)),
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa|efficient|softmax", re.IGNORECASE)),
    ("matmul_dense", re.compile(r"gemm|gemv|cutlass|sm\d\d_|nvjet|cublas|xmma|splitk|matmul", re.IGNORECASE)),
    ("argmax_sampling", re.compile(r"argmax|arg_max|topk|sort|multinomial|reduce_kernel.*max", re.IGNORECASE)),
    ("kv_cache_write", re.compile(r"index_copy|indexcopy|scatter|index_put", re.IGNORECASE)),
    ("fused_elementwise_norm_rope", re.compile(r"triton_|elementwise|vectorized|reduce|fill|copy|cat", re.IGNORECASE)),
)


def categorize(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def _device_time_us(event) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
        value = getattr(event, attr, None)
        if value:
            return float(value)
    return 0.0


def profile_decode(gen: FastGenerator, prompt: torch.Tensor, steps: int = 32) -> dict:
    """Profile ``steps`` greedy decode replays after a prefill of ``prompt``; per-step µs by category."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gen.generate(prompt, 2)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        gen.replay_greedy_steps(steps)
        end.record()
        torch.cuda.synchronize()
    wall_us = start.elapsed_time(end) * 1e3 / steps
    kernels: dict[str, float] = {}
    calls: dict[str, int] = {}
    launches = 0
    for event in prof.key_averages():
        if getattr(event, "device_type", None) != DeviceType.CUDA:
            continue
        us = _device_time_us(event)
        if us > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + us / steps
            calls[event.key] = calls.get(event.key, 0) + int(getattr(event, "count", 0))
            launches += int(getattr(event, "count", 0))
    by_category: dict[str, float] = {}
    for name, us in kernels.items():
        label = categorize(name)
        by_category[label] = by_category.get(label, 0.0) + us
    busy = sum(kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])
    return {
        "steps": steps,
        "step_us": wall_us,
        "kernel_us": busy,
        "gap_us": max(0.0, wall_us - busy),
        "overlap_us": max(0.0, busy - wall_us),
        "by_category_us": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels_us": [
            {"name": name[:120], "us": us, "calls_per_step": calls[name] / steps, "category": categorize(name)}
            for name, us in ranked
        ],
        "kernels_per_step": launches / steps,
    }


def format_profile(backend: str, batch: int, report: dict) -> str:
    head = (
        f"profile {backend} batch {batch}: {report['step_us']:.0f} us/step, kernels {report['kernel_us']:.0f} us, "
        f"idle gaps {report['gap_us']:.0f} us, {report['kernels_per_step']:.0f} kernels/step"
    )
    if report.get("overlap_us", 0.0) > 0.0:
        head += (f", kernels overlap by {report['overlap_us']:.0f} us (dependent launches: their time includes "
                 "waiting for the kernel ahead)")
    lines = [head]
    for label, us in report["by_category_us"].items():
        lines.append(f"  {label:<28} {us:>8.1f} us  {us / report['step_us']:>6.1%}")
    for item in report["top_kernels_us"]:
        per_call = item["us"] / max(item.get("calls_per_step", 1), 1e-9)
        lines.append(f"    {item['us']:>8.1f} us  {item.get('calls_per_step', 0):>5.0f} x {per_call:>6.2f} us  {item['name'][:90]}")
    return "\n".join(lines)
