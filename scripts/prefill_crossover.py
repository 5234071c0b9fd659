"""Where slicing a call into 16-token pieces stops beating the dense rebuild (device machine, one process).

Usage: python3 scripts/prefill_crossover.py
For each Llama-3 decoder-block shape and token count it times, in one CUDA-graph harness with weights rotated past
L2: fp16 cuBLAS, the dense path (the weight rebuilt by dequant.cu, then cuBLAS: ``dequant_dense_mm``) and the sliced
path (pieces of at most 16 tokens through the 1-16-token kernels: what the dispatcher runs up to
``SLICED_MAX_TOKENS``), on the tiled tables a GPU model holds, and checks both against the float64 reference.
Prints per-layer rows, then block sums with the faster path marked. Env: TOKENS (default 17,24,32,48,64,80,96),
CFGS (default m2v8g128,m1v4g128), MODELS (default 8B,70B).
"""
import functools
import os

import torch
import torch.nn.functional as F

from codegemm import reference
from codegemm.bench.timing import device_name, rotation_count, time_calls
from codegemm.layout import tile_tables
from codegemm.ops import custom_ops
from codegemm.random_model import random_layer_tensors

dev = torch.device("cuda")
print(device_name(dev), flush=True)
gen = torch.Generator(device=dev).manual_seed(0)
tokens_list = [int(t) for t in os.environ.get("TOKENS", "17,24,32,48,64,80,96").split(",")]
cfgs = os.environ.get("CFGS", "m2v8g128,m1v4g128").split(",")
models = os.environ.get("MODELS", "8B,70B").split(",")
SHAPES = {"8B": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
          "70B": [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)]}
PATHS = {"dense": functools.partial(custom_ops.dequant_dense_mm, tiled=True),
         "sliced": functools.partial(custom_ops.codebook_mma_mm, tiled=True)}

sums: dict[tuple[str, str, int, str], float] = {}
for model in models:
    for k, n in SHAPES[model]:
        xs = {t: torch.randn(t, k, device=dev, dtype=torch.float16) for t in tokens_list}
        weights = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for _ in range(rotation_count(n * k * 2))]
        fp16 = {t: time_calls([functools.partial(F.linear, xs[t], w) for w in weights]).median_us for t in tokens_list}
        del weights
        for cfg in cfgs:
            first = random_layer_tensors(cfg, n, k, dev, torch.float16, gen)  # row-major, for the reference
            layers = [tile_tables(*first)] + [tile_tables(*random_layer_tensors(cfg, n, k, dev, torch.float16, gen))
                                              for _ in range(rotation_count(n * k // 4) - 1)]
            codes, codebooks, scales = layers[0]
            for t in tokens_list:
                sums[(model, cfg, t, "fp16")] = sums.get((model, cfg, t, "fp16"), 0.0) + fp16[t]
                ref = reference.dense_matmul(xs[t], *first, None, torch.float64)
                row = [f"{k}x{n}", cfg, f"t={t}", f"fp16 {fp16[t]:.1f}"]
                for name, path in PATHS.items():
                    out = path(xs[t], codes, codebooks, scales, None)
                    err = float((out.double() - ref).norm() / ref.norm())
                    us = time_calls([functools.partial(path, xs[t], *layer, None) for layer in layers]).median_us
                    sums[(model, cfg, t, name)] = sums.get((model, cfg, t, name), 0.0) + us
                    row.append(f"{name} {us:.1f} (err {err:.1e})")
                print("  " + "  ".join(row), flush=True)
            del layers
            torch.cuda.empty_cache()

print("\nblock sums, µs (speedup over fp16); * = the faster of dense and sliced")
for model in models:
    for cfg in cfgs:
        for t in tokens_list:
            base = sums[(model, cfg, t, "fp16")]
            dense, sliced = sums[(model, cfg, t, "dense")], sums[(model, cfg, t, "sliced")]
            mark = ("*", "") if dense <= sliced else ("", "*")
            print(f"{model:4s} {cfg:9s} t={t:3d}  fp16 {base:7.1f}  dense {dense:7.1f}{mark[0]:1s} ({base / dense:.2f}x)"
                  f"  sliced {sliced:7.1f}{mark[1]:1s} ({base / sliced:.2f}x)")
