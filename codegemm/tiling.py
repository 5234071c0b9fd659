"""Switch a model's GPU-resident quantized layers to the tiled layout that the CUDA kernels read fastest.

Why: a one-token kernel reads the same 32-byte chunk of codes from many consecutive rows. Tiled
(:mod:`codegemm.layout`), those chunks are adjacent, so a warp's loads touch 4x fewer cache lines and 16
rows' scales share one sector. Only layers the CUDA library serves are tiled: every other kernel would
have to copy the tables back to row-major on each call. Checkpoints stay row-major.
"""

from __future__ import annotations

import torch
from torch import nn

from codegemm.nn import CodeGEMMLinear
from codegemm.ops.cuda import CUDA_CONFIGS, device_arch, load_library


def cuda_reads_tiled(layer: CodeGEMMLinear) -> bool:
    """Whether the CUDA kernels would serve this layer where it is: on a GPU of compute capability 8.0 or
    later with the library built, m2v8 or m1v4 with 8-bit codes and fp16 codebooks."""
    device = layer.codes.device
    config = layer.config
    if device.type != "cuda" or config.nbits != 8 or (config.num_codebooks, config.vec_len) not in CUDA_CONFIGS:
        return False
    if layer.codebooks.dtype != torch.float16 or layer.scales.dtype != torch.float16:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0) and load_library(device_arch(device)) is not None


def tile_for_gpu(model: nn.Module) -> int:
    """Tile every :class:`CodeGEMMLinear` of ``model`` that :func:`cuda_reads_tiled`; returns how many are
    tiled afterwards. Idempotent; :func:`untile` undoes it."""
    tiled = 0
    for module in model.modules():
        if isinstance(module, CodeGEMMLinear) and cuda_reads_tiled(module):
            tiled += module.tile_().tiled
    return tiled


def untile(model: nn.Module) -> None:
    """Every :class:`CodeGEMMLinear` of ``model`` back to the row-major layout."""
    for module in model.modules():
        if isinstance(module, CodeGEMMLinear):
            module.untile_()
