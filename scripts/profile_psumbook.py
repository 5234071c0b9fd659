"""One-token CUDA Psumbook on two benchmark shapes, to run under Nsight Compute (docs/KERNELS.md v10):

    ncu --clock-control none --kernel-name regex:psumbook_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy python3 scripts/profile_psumbook.py

profiles the third launch, the 8192x57344 layer (Llama-3-70B gate_up). Needs PYTHONPATH=. and a GPU.
The tables are in the tiled layout that models on a GPU hold (docs/KERNELS.md v11); ``ROWS=1`` profiles the
row-major layout instead. ``TOKENS=4`` runs four tokens through psumbook_mma.cu instead (``--kernel-name
regex:psumbook_mma_kernel``; ``TILES`` picks its 16-row tiles per warp); ``TOKENS`` of 5-16 runs the codebook
tensor-core kernel of codebook_mma.cu (``--kernel-name regex:codebook_mma_kernel``).
"""
import os

import torch
from codegemm.layout import tile_codes, tile_scales
from codegemm.random_model import random_layer_tensors
from codegemm.ops import cuda as cu
tiled = os.environ.get("ROWS", "0") in ("", "0")
tokens = int(os.environ.get("TOKENS", "1"))
tiles = int(os.environ.get("TILES", "0")) or None
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
for k, n in [(8192, 57344), (4096, 28672)]:
    codes, cb, s = random_layer_tensors("m2v8g128", n, k, dev, torch.float16, gen)
    if tiled:
        codes, s = tile_codes(codes), tile_scales(s)
    x = torch.randn(tokens, k, device=dev, dtype=torch.float16)
    for _ in range(4):
        if tokens == 1:
            cu.psumbook_matmul_cuda(x, codes, cb, s, None, tiled=tiled)
        else:
            cu.codebook_mma_cuda(x, codes, cb, s, None, tiles=tiles, tiled=tiled, psumbook=tokens <= 4)
    torch.cuda.synchronize()
print("done")
