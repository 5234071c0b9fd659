"""Round-to-nearest baseline: uniform ``b``-bit levels with per-(row, group) scales.

Symmetric RTN is itself a CodeGEMM format: one codebook of ``2**b`` scalars
``-2**(b-1) .. 2**(b-1)-1`` with ``vec_len=1``, i.e. config ``m1b{b}v1g{g}``.
So ``--method rtn`` writes an ordinary CodeGEMM checkpoint, comparable at equal
bits. The asymmetric variant (a zero point per group, as in most papers'
RTN rows) is not a codebook format; :func:`rtn_fake_quant` gives its dense
weight for evaluation only.
"""

from __future__ import annotations

import torch

from codegemm.config import CodebookConfig
from codegemm.errors import ConfigError


def check_rtn_config(config: CodebookConfig) -> None:
    """RTN fits the format only as ``m1b{bits}v1[g{group}]``."""
    if config.num_codebooks != 1 or config.vec_len != 1:
        raise ConfigError(
            f"method 'rtn' needs a scalar codebook config m1b<bits>v1g<group> (e.g. m1b4v1g128); got {config.name}"
        )


def rtn_quantize(weight: torch.Tensor, config: CodebookConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric RTN of ``weight [N, K]`` as ``(codes int64 [N, K, 1], codebooks [1, 2**b, 1], scales [N, K//g])``.

    Levels are the integers ``-2**(b-1) .. 2**(b-1)-1``; the scale of a group
    is ``absmax / 2**(b-1)`` so the most negative weight is exact and the
    largest positive one rounds to the top level.
    """
    check_rtn_config(config)
    w = weight.detach().float()
    n, k = w.shape
    group = config.group_size or k
    half = 1 << (config.nbits - 1)
    grouped = w.reshape(n, k // group, group)
    scales = (grouped.abs().amax(-1) / half).clamp_min(1e-12)
    levels = torch.round(grouped / scales[..., None]).clamp(-half, half - 1)
    codes = (levels + half).long().reshape(n, k, 1)
    codebooks = (torch.arange(config.codebook_size, dtype=torch.float32) - half).reshape(1, -1, 1)
    return codes, codebooks.to(w.device), scales


def rtn_fake_quant(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = False) -> torch.Tensor:
    """Dense RTN-rounded copy of ``weight [N, K]`` (asymmetric min-max with a zero point by default)."""
    if not 1 <= bits <= 16:
        raise ConfigError(f"bits must be in 1..16; got {bits}")
    w = weight.detach().float()
    n, k = w.shape
    group = group_size or k
    if k % group:
        raise ConfigError(f"in_features={k} must be a multiple of group_size={group}")
    grouped = w.reshape(n, k // group, group)
    if symmetric:
        half = 1 << (bits - 1)
        scale = (grouped.abs().amax(-1, keepdim=True) / half).clamp_min(1e-12)
        out = torch.round(grouped / scale).clamp(-half, half - 1) * scale
    else:
        top = (1 << bits) - 1
        lo = grouped.amin(-1, keepdim=True).clamp(max=0)
        hi = grouped.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / top).clamp_min(1e-12)
        zero = torch.round(-lo / scale)
        out = (torch.round(grouped / scale + zero).clamp(0, top) - zero) * scale
    return out.reshape(n, k).to(weight.dtype)
