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

Kernels read ``codes`` in exactly this layout: a row's codes are contiguous,
so one 16-byte load fetches ``16 / m`` consecutive vectors of a row. Checkpoints
store the same tensors under the module's prefix (``<module>.codes`` etc.).
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
