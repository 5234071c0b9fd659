"""A/B of Psumbook kernel variants at one token: each variant .cu next to the tree's psumbook.cu, one process, one GPU.

Usage (device machine): python3 scripts/psumbook_ab.py [VARIANT_DIR]
VARIANT_DIR (default build/exp/psb) holds copies of psumbook.cu to compare, e.g. the previous version
(`git show HEAD~1:codegemm/ops/cuda/psumbook.cu > build/exp/psb/old.cu`; carry the folder). Each build is
checked against the float64 reference and for run-to-run equality, then timed on the Llama-3 benchmark shapes
beside fp16 cuBLAS and the tensor-core kernel. Env: CFGS (configs), SPLITS (multiples of the default split
count), PERS (chunks per block instead), RPTS (one-token rows per lane pair, default 4,8), ONLY (one build), NOCHECK=1 (skip the checks), ROWS=1 (time and check
the row-major layout instead of the tiled one that models on a GPU hold, codegemm/layout.py).
Variants must export the current entry points (since v9 the launchers take a `Segments` pointer, common.cuh):
a psumbook.cu from before v9 has to be ported first. A `common.cuh` in VARIANT_DIR is what the variants include
(quoted includes look beside the file first), e.g. the previous version's, so a change there is A/B'd too.
"""
import functools, glob, os, subprocess, sys

import torch
import torch.nn.functional as F
from codegemm import reference
from codegemm.bench.timing import time_calls, rotation_count, device_name
from codegemm.random_model import random_layer_tensors
from codegemm.ops import cuda as cu
from codegemm.layout import tile_tables

dev = torch.device("cuda")
print(device_name(dev), flush=True)
variant_dir = sys.argv[1] if len(sys.argv) > 1 else "build/exp/psb"
srcs = {os.path.basename(v)[:-3]: v for v in sorted(glob.glob(os.path.join(variant_dir, "*.cu")))}
srcs["cur"] = "codegemm/ops/cuda/psumbook.cu"
libs, procs = {}, {}
for name, src in srcs.items():
    so = f"/tmp/psb_{name}.so"
    procs[name] = subprocess.Popen(["nvcc", "-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-Icodegemm/ops/cuda",
                                    "-gencode=arch=compute_90,code=sm_90", "-o", so, src, "codegemm/ops/cuda/codebook_mma.cu",
                                    "codegemm/ops/cuda/dequant.cu"])
for name, p in procs.items():
    assert p.wait() == 0, name
    lib = cu.bind_library(f"/tmp/psb_{name}.so")
    libs[name] = lib
print("built", list(libs), flush=True)
gen = torch.Generator(device=dev).manual_seed(0)


TILED = not os.environ.get("ROWS")


def layout(codes, codebooks, scales):
    """A layer's tables in the layout under test."""
    return tile_tables(codes, codebooks, scales) if TILED else (codes, codebooks, scales)


def use(lib):
    cu.load_library = lambda arch, lib=lib: lib


only = os.environ.get("ONLY")
if only:
    libs = {only: libs[only]}
pers = [int(v) for v in os.environ.get("PERS", "").split(",") if v]
rpts = [int(v) for v in os.environ.get("RPTS", "4,8").split(",")]
for name, lib in (libs.items() if not os.environ.get("NOCHECK") else []):
    use(lib)
    worst = 0.0
    for cfg in ["m2v8g128", "m1v4g128", "m2v8", "m1v4g512"]:
        for n, k in [(3000, 2048), (77, 512), (1000, 1536)]:
            codes, cb, s = random_layer_tensors(cfg, n, k, dev, torch.float16, gen)
            laid = layout(codes, cb, s)
            for t in (1, 2, 5, 16):
                for dt in (torch.float16, torch.bfloat16):
                    for rpt in rpts:
                        x = torch.randn(t, k, device=dev, dtype=dt)
                        ref = reference.dense_matmul(x, codes, cb, s, None, torch.float64)
                        got = cu.psumbook_matmul_cuda(x, *laid, None, rows_per_thread=rpt, tiled=TILED)
                        e = float((got.double() - ref).norm() / ref.norm())
                        again = cu.psumbook_matmul_cuda(x, *laid, None, rows_per_thread=rpt, tiled=TILED)
                        bound = 1e-3 if dt == torch.float16 else 8e-3
                        if dt == torch.float16:
                            worst = max(worst, e)
                        if not e < bound or not torch.equal(got, again):
                            print("BAD", name, cfg, n, k, t, dt, rpt, e, flush=True)
    print("checked", name, "worst fp16 rel err", worst, flush=True)

shapes = {"8B": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
          "70B": [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)]}
cfgs = os.environ.get("CFGS", "m2v8g128,m1v4g128").split(",")
split_mults = [float(v) for v in os.environ.get("SPLITS", "0.5,1,2").split(",")]
res = {}
for model, blk in shapes.items():
    for k, n in blk:
        copies = rotation_count(n * k * 2)
        ws = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        res[(model, k, n, "fp16")] = time_calls([functools.partial(F.linear, x, w) for w in ws]).median_us
        del ws
        for cfg in cfgs:
            copies = rotation_count(n * k // 4)
            layers = [layout(*random_layer_tensors(cfg, n, k, dev, torch.float16, gen)) for _ in range(copies)]
            use(libs["cur"])
            res[(model, k, n, f"{cfg}:mma")] = time_calls([functools.partial(cu.codebook_mma_cuda, x, *l, None, tiled=TILED) for l in layers]).median_us
            m = int(cfg[1])
            for name, lib in libs.items():
                use(lib)
                for rpt in rpts:
                    num_vectors = cu.layer_geometry(*layers[0], TILED)[1]
                    _, base = cu.plan_cuda(1, n, num_vectors, m, dev)
                    base = base * rpt // 4
                    best = None
                    chunks = num_vectors // (32 // m)
                    cands = [-(-chunks // p) for p in pers] if pers else [max(1, int(base * mult)) for mult in split_mults]
                    for sp in cands:
                        us = time_calls([functools.partial(cu.psumbook_matmul_cuda, x, *l, None, rpt, sp, TILED) for l in layers]).median_us
                        if best is None or us < best[0]:
                            best = (us, rpt, sp)
                        if pers:
                            print(f"  {cfg} {k}x{n} r{rpt} per_split={-(-chunks // sp)} splits={sp} {us:.1f}", flush=True)
                    key = (model, k, n, f"{cfg}:{name}:r{rpt}")
                    res[key] = best[0]
                    res[(model, k, n, f"{cfg}:{name}:r{rpt}:plan")] = best[1:]
            del layers
            torch.cuda.empty_cache()
        line = {kk[3]: (round(v, 1) if isinstance(v, float) else v) for kk, v in res.items() if kk[1:3] == (k, n)}
        print(k, n, line, flush=True)
print()
for model in shapes:
    kinds = sorted({kk[3] for kk in res if kk[0] == model and not kk[3].endswith(":plan")})
    tot = {kd: sum(v for kk, v in res.items() if kk[0] == model and kk[3] == kd) for kd in kinds}
    print(model, "t=1", "  ".join(f"{kd}={v:.1f}({tot['fp16'] / v:.2f}x)" for kd, v in tot.items()))
