"""The one place the stored layout of a quantized layer is defined.

A :class:`~codegemm.CodeGEMMLinear` with ``out_features = N``,
``in_features = K`` and config ``m{m}b{b}v{v}g{g}`` holds:

=============  ============================  ===================================
tensor         dtype                         shape and meaning
=============  ============================  ===================================
``codes``      uint8 (b <= 8), int32 beyond  ``[N, K // v, m]`` row-major: for output
                                             row ``n``, input vector ``j`` (inputs
                                             ``j*v .. j*v+v-1``), the index into
                                             codebook ``i``. Values in ``[0, 2**b)``.
``codebooks``  float (fp16 in checkpoints)   ``[m, 2**b, v]``: centroid ``c`` of
                                             codebook ``i``.
``scales``     float (fp16 in checkpoints)   ``[N, K // g]``; ``[N, 1]`` for per-row
                                             scales (``g = None``).
``bias``       float, optional               ``[N]``.
=============  ============================  ===================================

The dense weight is
``W[n, j*v + t] = scales[n, (j*v + t) // g] * sum_i codebooks[i, codes[n, j, i], t]``.

Checkpoints store these tensors under the module's prefix (``<module>.codes``
etc.), and every kernel reads them as they are.

**Tiled layout (GPU, in memory only).** A one-token GPU kernel reads, per
block, the same 32 code bytes (one *chunk*: ``32 / m`` vectors) of many
consecutive rows. Row-major, each row's chunk sits in its own cache line, and
each row's 2-byte scale costs a 32-byte sector of its own. :func:`tile_codes`
stores the codes ``[K*m / (32*v), N, 32]`` (chunk-major: consecutive rows'
chunks adjacent) and :func:`tile_scales` the scales ``[K // g, N]``, so a warp's
loads touch 4x fewer cache lines. Within a row's 32 bytes, byte ``s`` is stored
at ``s ^ (n % 16)`` (:data:`TILE_CODE_XOR`): the order in which the one-token
kernel's lanes gather their Psumbook tables (each lane of a warp starts at a
different table, so a warp's gathers hit distinct shared-memory banks), which
they otherwise permute in registers every chunk. The CUDA kernels take both layouts (strides);
:meth:`CodeGEMMLinear.tile_ <codegemm.nn.CodeGEMMLinear.tile_>` switches a
layer, and its ``state_dict`` is row-major whatever the layout in memory.
"""

from __future__ import annotations

import torch

from codegemm.config import CodebookConfig


def pack_codes(codes: torch.Tensor, config: CodebookConfig) -> torch.Tensor:
    """Canonical integer codes ``[N, K // v, m]`` in the storage dtype, contiguous."""
    return codes.to(config.code_dtype).contiguous()


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Stored codes back to ``int64 [N, K // v, m]`` for indexing."""
    return codes.long()


TILE_BYTES = 32
"""Code bytes of one row per chunk of the tiled layout (one 32-byte sector)."""


def can_tile(config: CodebookConfig, in_features: int) -> bool:
    """Whether a layer's codes split into whole 32-byte chunks per row (8-bit codes, ``m`` divides 32)."""
    m = config.num_codebooks
    return config.nbits <= 8 and TILE_BYTES % m == 0 and (in_features // config.vec_len) % (TILE_BYTES // m) == 0


TILE_CODE_XOR = 15
"""Byte ``s`` of row ``n``'s 32 tiled code bytes sits at ``s ^ (n & TILE_CODE_XOR)`` (``Segments::code_xor``)."""


def _swizzled(tiled: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor with byte ``s`` of each row's chunk moved to ``s ^ (n & TILE_CODE_XOR)``; its own
    inverse. (Never in place: a one-chunk layer's transposed view is the caller's tensor.)"""
    out = tiled.clone(memory_format=torch.contiguous_format)
    position = torch.arange(TILE_BYTES, device=tiled.device)
    for residue in range(1, min(TILE_CODE_XOR + 1, tiled.shape[1])):
        out[:, residue::TILE_CODE_XOR + 1] = tiled[:, residue::TILE_CODE_XOR + 1][:, :, position ^ residue]
    return out


def tile_codes(codes: torch.Tensor) -> torch.Tensor:
    """Row-major uint8 codes ``[N, K // v, m]`` -> tiled ``[chunks, N, 32]`` (contiguous, bytes swizzled)."""
    n = codes.shape[0]
    return _swizzled(codes.reshape(n, -1, TILE_BYTES).transpose(0, 1))


def untile_codes(tiled: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    """Tiled codes ``[chunks, N, 32]`` -> row-major ``[N, K // v, m]`` (contiguous)."""
    n = tiled.shape[1]
    return _swizzled(tiled).transpose(0, 1).reshape(n, -1, num_codebooks).contiguous()


def tile_scales(scales: torch.Tensor) -> torch.Tensor:
    """Row-major scales ``[N, K // g]`` -> tiled ``[K // g, N]`` (contiguous)."""
    return scales.t().contiguous()


def tile_tables(codes: torch.Tensor, codebooks: torch.Tensor,
                scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A row-major layer's ``(codes, codebooks, scales)`` in the tiled layout (codebooks unchanged)."""
    return tile_codes(codes), codebooks, tile_scales(scales)


def untile_scales(tiled: torch.Tensor) -> torch.Tensor:
    """Tiled scales ``[K // g, N]`` -> a row-major ``[N, K // g]`` view (differentiable, not contiguous)."""
    return tiled.t()


def as_rows(codes: torch.Tensor, scales: torch.Tensor, num_codebooks: int,
            tiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` row-major whatever their layout: a copy of tiled tensors, the tensors themselves
    otherwise. For kernels that only read row-major tables."""
    if not tiled:
        return codes, scales
    return untile_codes(codes, num_codebooks), untile_scales(scales)
