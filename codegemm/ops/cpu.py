"""CPU Psumbook matmul: one vectorized gather-and-sum through ``embedding_bag``.

The Psumbook of the tokens becomes an embedding table with one row per
(vector, codebook, centroid) and one column per token; each (output row, scale
group) is a bag of ``(g // v) * m`` rows of it. ``embedding_bag`` then does the
gather and the per-group sum in one multithreaded pass with no Python loop over
rows, and nothing is shared between calls, so concurrent calls are safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codegemm import reference

_MIN_TABLE_COLUMNS = 4
"""embedding_bag is ~20x slower with a one-column table; pad tiny batches to this."""


def psumbook_matmul_cpu(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` in ``x``'s dtype, accumulated in float32."""
    n, num_vectors, m = codes.shape
    size, v = codebooks.shape[1], codebooks.shape[2]
    tokens = x.shape[0]
    groups = scales.shape[1]
    xf = x.float()
    if tokens < _MIN_TABLE_COLUMNS:
        xf = torch.cat([xf, xf.new_zeros(_MIN_TABLE_COLUMNS - tokens, xf.shape[1])])
    columns = xf.shape[0]
    table = torch.einsum("tjv,icv->jict", xf.view(columns, num_vectors, v), codebooks.float())
    table = table.reshape(num_vectors * m * size, columns)
    offsets = torch.arange(num_vectors * m, dtype=torch.int32).view(num_vectors, m) * size
    index = (codes.to(torch.int32) + offsets).view(n * groups, (num_vectors // groups) * m)
    bags = F.embedding_bag(index, table, mode="sum").view(n, groups, columns)
    out = torch.einsum("ngt,ng->tn", bags, scales.float())[:tokens]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def dense_matmul_cpu(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize to float32 and multiply: cheaper than the Psumbook once T is large."""
    weight = reference.dequantize(codes, codebooks, scales, torch.float32)
    out = F.linear(x.float(), weight, None if bias is None else bias.float())
    return out.to(x.dtype)
