"""Triton dequantization to a dense weight, for prefill: rebuild ``W`` once, then let cuBLAS multiply.

With many tokens the matmul is compute-bound, and cuBLAS on a dense fp16/bf16
weight beats any dequantize-in-registers GEMM written here so far (the fused
``triton_dequant_gemm`` reaches 0.04-0.1x fp16). So for more than 16 tokens the
weight is rebuilt in one memory-bound pass into a fresh temporary in the
activations' dtype and handed to ``F.linear``. Each program writes a
``BN x BJ*v`` tile: per codebook one code load and one centroid gather (the
codebooks are a few KiB and stay in cache), summed in fp32, times the row's
group scale, cast once, stored contiguously along K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegemm.errors import DTypeError
from codegemm.layout import as_rows
from codegemm.ops.cuda import cuda_dequant_eligible, dequantize_cuda
from codegemm.validation import check_quantized_metadata

DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _dequant_dense_kernel(
    codes_ptr,
    cb_ptr,
    scales_ptr,
    w_ptr,
    N,
    J,
    G,
    VPG,
    V: tl.constexpr,
    V_P: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    BN: tl.constexpr,
    BJ: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    n = pid_n * BN + tl.arange(0, BN)
    vj = pid_j * BJ + tl.arange(0, BJ)
    lane = tl.arange(0, V_P)
    n_mask = n < N
    tile_mask = n_mask[:, None] & (vj < J)[None, :]
    n64 = n.to(tl.int64)
    row_codes = codes_ptr + n64[:, None] * (J * M) + (vj * M)[None, :]
    w = tl.zeros([BN, BJ, V_P], dtype=tl.float32)
    for i in tl.static_range(M):
        # Masking to the codebook size keeps a corrupted code inside the codebook: never a stray access.
        code = tl.load(row_codes + i, mask=tile_mask, other=0).to(tl.int32) & (C - 1)
        w += tl.load(
            cb_ptr + i * C * V + code[:, :, None] * V + lane[None, None, :],
            mask=(lane < V)[None, None, :],
            other=0.0,
        ).to(tl.float32)
    scale = tl.load(scales_ptr + n64[:, None] * G + (vj // VPG)[None, :], mask=tile_mask, other=0.0)
    w = w * scale.to(tl.float32)[:, :, None]
    out = w_ptr + n64[:, None, None] * (J * V) + (vj * V)[None, :, None] + lane[None, None, :]
    tl.store(out, w.to(w_ptr.dtype.element_ty), mask=tile_mask[:, :, None] & (lane < V)[None, None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype not in DENSE_DTYPES:
        raise DTypeError(f"dtype must be float16, bfloat16 or float32; got {dtype}")
    check_quantized_metadata(codes, codebooks, scales)


def dequantize_triton(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype,
    block_n: int = 16,
    block_k: int = 256,
) -> torch.Tensor:
    """Dense weight ``[N, K]`` in ``dtype``: the math of :func:`codegemm.reference.dequantize`, summed in fp32.

    ``codes`` integer ``[N, K//v, m]``, ``codebooks [m, 2**b, v]``, ``scales [N, K//g]`` (``[N, 1]`` per-row),
    all on one device (CUDA, or the CPU under ``TRITON_INTERPRET=1``). Returns a fresh tensor.
    """
    _check(codes, codebooks, scales, dtype)
    codes, codebooks, scales = codes.contiguous(), codebooks.contiguous(), scales.contiguous()
    n, num_vectors, m = codes.shape
    size, v = codebooks.shape[1], codebooks.shape[2]
    groups = scales.shape[1]
    weight = torch.empty(n, num_vectors * v, dtype=dtype, device=codes.device)
    if weight.numel() == 0:
        return weight
    v_pad = _next_pow2(v)
    block_j = max(1, block_k // v_pad)
    grid = (triton.cdiv(n, block_n), triton.cdiv(num_vectors, block_j))
    _dequant_dense_kernel[grid](
        codes,
        codebooks,
        scales,
        weight,
        n,
        num_vectors,
        groups,
        num_vectors // groups,
        V=v,
        V_P=v_pad,
        M=m,
        C=size,
        BN=block_n,
        BJ=block_j,
        num_warps=4,
    )
    return weight


def dequant_dense_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    tiled: bool = False,
) -> torch.Tensor:
    """``x [T, K] @ W.T + bias`` through a temporary dense ``W`` in ``x``'s dtype (inputs checked by the op).

    ``W`` comes from the CUDA dequantization (``codegemm/ops/cuda/dequant.cu``, either layout) for the configs
    compiled into it, from the Triton kernel above (row-major) otherwise; both equal
    ``reference.dequantize(..., float32).to(dtype)``.
    """
    if cuda_dequant_eligible(codes, codebooks, scales, x.dtype, tiled):
        weight = dequantize_cuda(codes, codebooks, scales, x.dtype, tiled)
    else:
        codes, scales = as_rows(codes, scales, codebooks.shape[0], tiled)
        weight = dequantize_triton(codes, codebooks, scales.contiguous(), x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
