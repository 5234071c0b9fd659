"""A/B of the 2-16-token kernels (codebook_mma.cu, psumbook_mma.cu): prebuilt libraries and plans, one process, one GPU.

Usage (device machine): python3 scripts/mma_ab.py NAME=LIB.so [NAME=LIB.so ...]
Build a library of the tree with `CODEGEMM_CUDA_CACHE=DIR python3 -c "from codegemm.ops.cuda import build;
build('sm_90')"` (or of an older checkout) and carry it. Each library and variant is checked against the float64
reference (tails, both dtypes) and for run-to-run equality, then timed on the Llama-3 decoder-block shapes in the
tiled layout beside cuBLAS in the same dtype. Env: DTYPE of the timed activations (float16, the default, or
bfloat16), TOKENS (default 2,4,8,16), CFGS, VARIANTS (comma-separated; default "auto"):
"auto" is the dispatcher's choice (psumbook.cu at one token), "mma" forces codebook_mma.cu, "pmma" psumbook_mma.cu (fp16, <= 4 tokens), with
optional suffixes "-tN" (N 16-row tiles per warp), "-sF" (F times the planned splits, e.g. -s2, -s0.5), "-cN" (N
chunks of 128 inputs per split) and "-xN"
(N token-chunks of activations per split on chip instead of ``mma_x_budget``); "auto" at one token takes "-rN" (N
rows per lane pair) and "-cN" (N chunks per split) instead.
"""
import functools
import os
import sys

import torch
import torch.nn.functional as F

from codegemm import reference
from codegemm.bench.timing import device_name, rotation_count, time_calls
from codegemm.layout import tile_tables
from codegemm.ops import cuda as cu
from codegemm.random_model import random_layer_tensors

dev = torch.device("cuda")
print(device_name(dev), flush=True)
libs = {arg.split("=", 1)[0]: cu.bind_library(arg.split("=", 1)[1]) for arg in sys.argv[1:]}
gen = torch.Generator(device=dev).manual_seed(0)
tokens_list = [int(t) for t in os.environ.get("TOKENS", "2,4,8,16").split(",")]
cfgs = os.environ.get("CFGS", "m2v8g128,m1v4g128").split(",")
variants = os.environ.get("VARIANTS", "auto").split(",")
timed_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[os.environ.get("DTYPE", "float16")]
DEFAULT_X_BUDGET = cu.mma_x_budget


def variant_call(variant: str, x: torch.Tensor, layer: tuple) -> functools.partial | None:
    """The kernel call a variant names, or None where it does not apply (psumbook_mma.cu: fp16, <= 4 tokens)."""
    kernel, *opts = variant.split("-")

    def option(prefix: str, cast=int, default=None):
        return next((cast(o[1:]) for o in opts if o.startswith(prefix)), default)

    per_split = option("c")  # both kernels' chunks are 128 inputs (m2v8, m1v4)
    splits = None if per_split is None else -(-(x.shape[1] // cu.MMA_CHUNK_INPUTS) // per_split)
    if kernel == "auto" and x.shape[0] < cu.MMA_MIN_TOKENS[(layer[1].shape[0], layer[1].shape[2])]:
        return functools.partial(cu.psumbook_matmul_cuda, x, *layer, None, rows_per_thread=option("r"), splits=splits,
                                 tiled=True)
    psumbook = {"auto": None, "mma": False, "pmma": True}[kernel]
    if psumbook and not cu.psumbook_mma_fits(x, True):
        return None
    tiles = option("t")
    factor = option("s", float, 1.0)
    limit = option("x")
    cu.mma_x_budget = DEFAULT_X_BUDGET if limit is None else (lambda tokens, device, limit=limit: limit)
    if splits is None and factor != 1.0:
        n = sum(cu.layer_geometry(*layer, True)[0] for layer in [layer])
        fits = cu.psumbook_mma_chosen(x, layer[1], True) if psumbook is None else psumbook
        plan = cu.plan_psumbook_mma(n, x.shape[1], x.device) if fits else cu.plan_mma(x.shape[0], n, x.shape[1], x.device)
        splits = max(1, round(plan[1] * factor))
    return functools.partial(cu.codebook_mma_cuda, x, *layer, None, tiles=tiles, splits=splits, tiled=True,
                             psumbook=psumbook)


def use(lib):
    cu.load_library = lambda arch, lib=lib: lib


for name, lib in libs.items():
    use(lib)
    worst = 0.0
    for cfg in cfgs + ["m2v8"]:
        for n, k in [(3000, 2048), (77, 512), (1000, 1536)]:
            layer = random_layer_tensors(cfg, n, k, dev, torch.float16, gen)
            laid = tile_tables(*layer)
            for t in (1, 2, 3, 4, 5, 9, 16):
                for dt in (torch.float16, torch.bfloat16):
                    x = torch.randn(t, k, device=dev, dtype=dt)
                    ref = reference.dense_matmul(x, *layer, None, torch.float64)
                    for variant in variants:
                        call = variant_call(variant, x, laid)
                        if call is None:
                            continue
                        got, again = call(), call()
                        err = float((got.double() - ref).norm() / ref.norm())
                        if dt == torch.float16:
                            worst = max(worst, err)
                        if not err < (1e-3 if dt == torch.float16 else 8e-3) or not torch.equal(got, again):
                            print("BAD", name, variant, cfg, n, k, t, dt, err, flush=True)
    print("checked", name, "worst fp16 rel err", f"{worst:.2e}", flush=True)

shapes = {"8B": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
          "70B": [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)]}
sums: dict[tuple[str, int, str], float] = {}
for model, block in shapes.items():
    for k, n in block:
        weights = [torch.randn(n, k, device=dev, dtype=timed_dtype) * 0.02 for _ in range(rotation_count(n * k * 2))]
        xs = {t: torch.randn(t, k, device=dev, dtype=timed_dtype) for t in tokens_list}
        for t in tokens_list:
            us = time_calls([functools.partial(F.linear, xs[t], w) for w in weights]).median_us
            sums[(model, t, "fp16")] = sums.get((model, t, "fp16"), 0.0) + us
        del weights
        for cfg in cfgs:
            layers = [tile_tables(*random_layer_tensors(cfg, n, k, dev, torch.float16, gen))
                      for _ in range(rotation_count(n * k // 4))]
            for name, lib in libs.items():
                use(lib)
                for t in tokens_list:
                    for variant in variants:
                        calls = [variant_call(variant, xs[t], layer) for layer in layers]
                        if calls[0] is None:
                            continue
                        us = time_calls(calls).median_us
                        key = (model, t, f"{cfg}:{name}:{variant}")
                        sums[key] = sums.get(key, 0.0) + us
                        print(f"  {k}x{n} {cfg} {name} {variant} t={t} {us:.1f}", flush=True)
            del layers
            torch.cuda.empty_cache()
print()
for (model, t, kind), us in sorted(sums.items()):
    print(f"{model} t={t:2d} {kind:24s} {us:8.1f} us  {sums[(model, t, 'fp16')] / us:.2f}x fp16")
