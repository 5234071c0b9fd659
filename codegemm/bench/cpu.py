"""`codegemm bench cpu`: the CPU Psumbook path against dequantize-then-matmul and dense fp32.

All three run in one process on the same random layer; the table reports
milliseconds (median of repeats after a warm-up) and the speedup of the
Psumbook path over dequantize-then-matmul.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from codegemm.config import CodebookConfig
from codegemm.ops.cpu import dense_matmul_cpu, psumbook_matmul_cpu
from codegemm.random_model import random_layer_tensors

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="m2v8g128", help="codebook config name (default: m2v8g128)")
    parser.add_argument("--shape", default="4096x4096", help="KxN of the layer (default: 4096x4096)")
    parser.add_argument("--tokens", default="1,4,16,64", help="comma-separated token counts")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per row (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = CodebookConfig.from_name(args.config)
    k, n = (int(d) for d in args.shape.lower().split("x"))
    generator = torch.Generator().manual_seed(0)
    codes, codebooks, scales = random_layer_tensors(config, n, k, "cpu", torch.float16, generator)
    dense = torch.randn(n, k) * 0.02
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, k, dtype=torch.float16)
        psum = median_ms(lambda: psumbook_matmul_cpu(x, codes, codebooks, scales), args.repeats)
        deq = median_ms(lambda: dense_matmul_cpu(x, codes, codebooks, scales), args.repeats)
        fp32 = median_ms(lambda: F.linear(x.float(), dense), args.repeats)
        rows.append(dict(tokens=tokens, psumbook_ms=psum, dequant_matmul_ms=deq, dense_fp32_ms=fp32))
    cpu = platform.processor() or platform.machine()
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; {config.name} K={k} N={n}")
    print(f"{'tokens':>6} {'psumbook ms':>12} {'dequant+mm ms':>14} {'dense fp32 ms':>14} {'speedup':>8}")
    for r in rows:
        speedup = r["dequant_matmul_ms"] / r["psumbook_ms"]
        print(
            f"{r['tokens']:>6} {r['psumbook_ms']:>12.2f} {r['dequant_matmul_ms']:>14.2f} "
            f"{r['dense_fp32_ms']:>14.2f} {speedup:>7.1f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=config.name, k=k, n=n, threads=torch.get_num_threads(), rows=rows), f, indent=1)
    return 0
