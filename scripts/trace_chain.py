"""Where a chain of layer calls spends its time: each kernel's body and the hand-offs between kernels.

Usage (device machine): python3 scripts/trace_chain.py [NAME=LIB.so ...]
Builds (or takes from ``$CODEGEMM_CUDA_CACHE``) the library with ``-DCODEGEMM_TRACE``, whose blocks stamp
%globaltimer at their start, at the end of their wait for the kernel ahead and at their end (common.cuh,
``BlockTrace``). It captures one CUDA graph of a layer called on rotated weight copies, as the kernel benchmark
does, replays it, and splits each call into: the matmul's body (first block released to last block done), the
hand-off to the split-K reduce, the reduce's body and the hand-off to the next matmul (medians over the calls).
The same chain is also timed plain (no stamps; the stamps cost ~1 µs per call) with the tree's library and with
any NAME=LIB.so given. Env: TOKENS (default 1,4,16), CFG (default m2v8g128).
"""
import ctypes
import functools
import os
import statistics
import sys

import numpy as np
import torch

from codegemm.bench.timing import device_name, rotation_count, time_calls
from codegemm.layout import tile_tables
from codegemm.ops import cuda as cu
from codegemm.random_model import random_layer_tensors

SETTERS = ("codegemm_trace_set_psumbook", "codegemm_trace_set_codebook_mma", "codegemm_trace_set_psumbook_mma")
KINDS = {1: "psumbook", 2: "codebook_mma", 3: "psumbook_mma", 4: "reduce", 5: "gated_reduce"}
CAPACITY = 1 << 18
SHAPES = [("8B qkv", 4096, 6144), ("8B o", 4096, 4096), ("8B gate_up", 4096, 28672), ("8B down", 14336, 4096),
          ("70B o", 8192, 8192), ("70B gate_up", 8192, 57344)]
COLUMNS = ["layer", "tokens", "kernel", "grid", "reduce_grid", "plain_us", "traced_us", "matmul_body", "block_median",
           "to_reduce", "reduce_body", "to_next"]


def launches(records: np.ndarray, kind: int) -> list[np.ndarray]:
    """The records of each launch of one kernel, in launch order (blocks sorted by the end of their wait)."""
    mine = records[(records[:, 0] >> 48) == kind]
    if len(mine) == 0:
        return []
    grid = int((mine[0, 0] >> 24) & 0xFFFFFF)
    mine = mine[np.argsort(mine[:, 2], kind="stable")]
    return [mine[i * grid:(i + 1) * grid] for i in range(len(mine) // grid)]


def split_chain(records: np.ndarray) -> dict[str, float]:
    """Median µs of each stage over the chain's calls (its first and last call left out)."""
    kind = next(k for k in (1, 2, 3) if ((records[:, 0] >> 48) == k).any())
    matmuls = launches(records, kind)
    reduces = launches(records, 4) + launches(records, 5)
    if len(reduces) != len(matmuls):
        reduces = []
    stages: dict[str, list[float]] = {k: [] for k in ("matmul_body", "block_median", "to_reduce", "reduce_body", "to_next")}
    for i in range(1, len(matmuls) - 1):
        released, done = matmuls[i][:, 2].min(), matmuls[i][:, 3].max()
        next_released = matmuls[i + 1][:, 2].min()
        stages["matmul_body"].append(done - released)
        stages["block_median"].append(float(np.median(matmuls[i][:, 3] - matmuls[i][:, 2])))
        if reduces:
            reduce_released, reduce_done = reduces[i][:, 2].min(), reduces[i][:, 3].max()
            stages["to_reduce"].append(reduce_released - done)
            stages["reduce_body"].append(reduce_done - reduce_released)
            stages["to_next"].append(next_released - reduce_done)
        else:
            stages["to_next"].append(next_released - done)
    row = {k: statistics.median(v) / 1000 if v else float("nan") for k, v in stages.items()}
    row.update(kernel=KINDS[kind], grid=len(matmuls[0]), reduce_grid=len(reduces[0]) if reduces else 0)
    return row


def main() -> None:
    dev = torch.device("cuda")
    arch = cu.device_arch(dev)
    traced = cu.bind_library(cu.build(arch, ("CODEGEMM_TRACE",)))
    for name in SETTERS:
        getattr(traced, name).argtypes = [ctypes.c_void_p, ctypes.c_uint]
        getattr(traced, name).restype = ctypes.c_int
    plain = {"plain": cu.bind_library(cu.build(arch))}
    plain.update({a.split("=", 1)[0]: cu.bind_library(a.split("=", 1)[1]) for a in sys.argv[1:]})
    buffers = {name: torch.zeros(CAPACITY * 4, dtype=torch.int64, device=dev) for name in SETTERS}
    tokens_list = [int(t) for t in os.environ.get("TOKENS", "1,4,16").split(",")]
    cfg = os.environ.get("CFG", "m2v8g128")
    gen = torch.Generator(device=dev).manual_seed(0)
    print(device_name(dev), cfg, flush=True)

    def arm() -> None:
        for name, buffer in buffers.items():
            buffer.zero_()
            if getattr(traced, name)(buffer.data_ptr(), CAPACITY) != 0:
                raise RuntimeError(f"{name} failed")

    def use(lib: ctypes.CDLL) -> None:
        cu.load_library = lambda arch, lib=lib: lib

    rows = []
    for layer_name, k, n in SHAPES:
        copies = rotation_count(n * k // 4, dev)
        layers = [tile_tables(*random_layer_tensors(cfg, n, k, dev, torch.float16, gen)) for _ in range(copies)]
        for tokens in tokens_list:
            x = torch.randn(tokens, k, device=dev, dtype=torch.float16)
            one_token = tokens < cu.MMA_MIN_TOKENS[(layers[0][1].shape[0], layers[0][1].shape[2])]
            op = cu.psumbook_matmul_cuda if one_token else cu.codebook_mma_cuda
            calls = [functools.partial(op, x, *layer, None, tiled=True) for layer in layers]
            row = {"layer": layer_name, "tokens": tokens}
            for lib_name, lib in plain.items():
                use(lib)
                row[f"{lib_name}_us" if lib_name != "plain" else "plain_us"] = time_calls(calls).median_us
            use(traced)
            arm()
            row["traced_us"] = time_calls(calls).median_us
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for call in calls:
                    call()
            graph.replay()
            torch.cuda.synchronize()
            arm()
            graph.replay()
            torch.cuda.synchronize()
            records = np.concatenate([b.view(-1, 4).cpu().numpy() for b in buffers.values()])
            row.update(split_chain(records[records[:, 1] != 0]))
            rows.append(row)
            print(row, flush=True)
        del layers
        torch.cuda.empty_cache()
    columns = COLUMNS + [f"{name}_us" for name in plain if name != "plain"]
    print("\n" + " | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns))


if __name__ == "__main__":
    main()
