"""The specification: plain-PyTorch dequantization and Psumbook matmul in float32/float64.

Every kernel is tested against these functions and they are the fallback
backend. Shapes (see :mod:`codegemm.layout`)::

    codes     int   [N, K // v, m]   values in [0, 2**b)
    codebooks float [m, 2**b, v]
    scales    float [N, K // g]      ([N, 1] for per-row scales)
    W[n, j*v + t] = scales[n, (j*v + t) // g] * sum_i codebooks[i, codes[n, j, i], t]
    y = x @ W.T + bias
"""

from __future__ import annotations

import torch

_GATHER_BUDGET = 1 << 24
"""Elements gathered at once by :func:`psumbook_matmul`; bounds its peak memory."""


def dequantize(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense weight ``[N, K]`` in ``dtype`` rebuilt from codes, codebooks and scales."""
    n, num_vectors, m = codes.shape
    v = codebooks.shape[-1]
    books = codebooks.to(dtype)
    index = codes.long()
    weight = books[0][index[..., 0]]
    for i in range(1, m):
        weight = weight + books[i][index[..., i]]
    k = num_vectors * v
    groups = scales.shape[1]
    weight = weight.reshape(n, groups, k // groups) * scales.to(dtype)[:, :, None]
    return weight.reshape(n, k)


def psumbook(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Inner products of each ``v``-slice of ``x [..., K]`` with every centroid.

    Returns ``[..., K // v, m, 2**b]`` in ``x``'s dtype:
    ``psum[..., j, i, c] = <x[..., j*v:(j+1)*v], codebooks[i, c]>``.
    """
    m, size, v = codebooks.shape
    slices = x.reshape(*x.shape[:-1], x.shape[-1] // v, v)
    return torch.einsum("...jt,ict->...jic", slices, codebooks.to(x.dtype))


def psumbook_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``x @ W.T + bias`` computed the CodeGEMM way, in ``compute_dtype``.

    Builds the Psumbook, gathers one entry per (row, vector, codebook), sums the
    codebooks, sums each scale group, scales and sums the groups. Returns
    ``[..., N]`` in ``compute_dtype``.
    """
    n, num_vectors, m = codes.shape
    size = codebooks.shape[1]
    lead = x.shape[:-1]
    tokens = x.reshape(-1, x.shape[-1]).to(compute_dtype)
    t = tokens.shape[0]
    table = psumbook(tokens, codebooks.to(compute_dtype)).reshape(t, num_vectors * m * size)
    offsets = torch.arange(num_vectors * m, device=codes.device).view(num_vectors, m) * size
    groups = scales.shape[1]
    scale = scales.to(compute_dtype)
    out = torch.empty(t, n, dtype=compute_dtype, device=x.device)
    rows_per_chunk = max(1, _GATHER_BUDGET // max(1, t * num_vectors * m))
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        index = (codes[start:stop].long() + offsets).reshape(stop - start, num_vectors * m)
        picked = table[:, index]  # [t, rows, J*m]
        per_vector = picked.reshape(t, stop - start, num_vectors, m).sum(-1)
        per_group = per_vector.reshape(t, stop - start, groups, num_vectors // groups).sum(-1)
        out[:, start:stop] = (per_group * scale[start:stop]).sum(-1)
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.reshape(*lead, n)


def dense_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``x @ dequantize(...).T + bias`` in ``compute_dtype``: the same function, the plain way."""
    weight = dequantize(codes, codebooks, scales, compute_dtype)
    out = x.to(compute_dtype) @ weight.T
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out
