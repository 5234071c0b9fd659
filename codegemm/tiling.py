"""Switch a model's GPU-resident quantized layers to the tiled layout that the CUDA kernels read fastest.

Why: a one-token kernel reads the same 32-byte chunk of codes from many consecutive rows. Tiled
(:mod:`codegemm.layout`), those chunks are adjacent, so a warp's loads touch 4x fewer cache lines and 16
rows' scales share one sector. Only layers the CUDA library serves are tiled: every other kernel would
have to copy the tables back to row-major on each call. Checkpoints stay row-major.
"""

from __future__ import annotations

from torch import nn

from codegemm.layout import can_tile
from codegemm.nn import CodeGEMMLinear
from codegemm.ops.cuda import library_serves


def cuda_reads_tiled(layer: CodeGEMMLinear) -> bool:
    """Whether the CUDA kernels serve this layer where it is (:func:`codegemm.ops.cuda.library_serves`) and
    its config tiles."""
    return can_tile(layer.config, layer.in_features) and library_serves(layer.codes, layer.codebooks, layer.scales)


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
