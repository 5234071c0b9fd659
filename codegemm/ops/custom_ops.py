"""The Triton kernels as torch custom ops, so ``torch.compile(fullgraph=True)`` and CUDA graphs see one op.

Each op has a fake (meta) implementation that checks ranks, dtypes and
divisibility without touching data and returns an empty ``[T, N]`` tensor in
``x``'s dtype. The real implementations make ``x`` and the quantized tensors
contiguous (a no-op when they already are) and launch the kernel; outputs are
fresh tensors on every call.
"""

from __future__ import annotations

from typing import Optional

import torch

from codegemm.errors import DTypeError, ShapeError
from codegemm.ops.cuda import codebook_mma_cuda, codebook_mma_eligible, cuda_psumbook_eligible, psumbook_matmul_cuda
from codegemm.ops.triton_dequant import dequant_matmul_triton
from codegemm.ops.triton_dequant_dense import dequant_dense_matmul
from codegemm.ops.triton_psumbook import psumbook_matmul_triton
from codegemm.validation import KERNEL_CODE_DTYPES, KERNEL_FLOAT_DTYPES, check_quantized_metadata

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = KERNEL_FLOAT_DTYPES


def check_matmul_args(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    code_dtypes: tuple[torch.dtype, ...] = KERNEL_CODE_DTYPES,
) -> None:
    """Raise ShapeError/DTypeError unless the tensors describe one valid layer call (metadata only)."""
    if x.dim() != 2:
        raise ShapeError(f"x must have shape (tokens, in_features); got rank {x.dim()} {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise DTypeError(f"x must be float16, bfloat16 or float32 for the Triton kernels; got {x.dtype}")
    n, k, _ = check_quantized_metadata(codes, codebooks, scales, code_dtypes)
    if x.shape[1] != k:
        raise ShapeError(f"x must have in_features={k} (codes.shape[1] * vec_len) columns; got {tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.dtype not in _FLOAT_DTYPES):
        raise ShapeError(f"bias must be a float tensor (out_features={n},); got {bias.dtype} {tuple(bias.shape)}")
    devices = {t.device for t in (x, codes, codebooks, scales) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise DTypeError(f"x, codes, codebooks, scales and bias must be on one device; got {sorted(map(str, devices))}")


def _contiguous(*tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    return [None if t is None else t.contiguous() for t in tensors]


@torch.library.custom_op("codegemm::psumbook_mm", mutates_args=())
def psumbook_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Psumbook matmul for 1-16 tokens: ``x [T, K]`` fp16/bf16/fp32, uint8 ``codes [N, K//v, m]`` -> ``[T, N]``."""
    check_matmul_args(x, codes, codebooks, scales, bias, (torch.uint8,))
    x, codes, codebooks, scales, bias = _contiguous(x, codes, codebooks, scales, bias)
    return psumbook_matmul_triton(x, codes, codebooks, scales, bias)


@psumbook_mm.register_fake
def _psumbook_mm_fake(x, codes, codebooks, scales, bias=None):
    check_matmul_args(x, codes, codebooks, scales, bias, (torch.uint8,))
    return x.new_empty(x.shape[0], codes.shape[0])


@torch.library.custom_op("codegemm::dequant_mm", mutates_args=())
def dequant_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dequantize-in-registers tensor-core GEMM for any token count: ``x [T, K]`` -> ``[T, N]``."""
    check_matmul_args(x, codes, codebooks, scales, bias)
    x, codes, codebooks, scales, bias = _contiguous(x, codes, codebooks, scales, bias)
    return dequant_matmul_triton(x, codes, codebooks, scales, bias)


@dequant_mm.register_fake
def _dequant_mm_fake(x, codes, codebooks, scales, bias=None):
    check_matmul_args(x, codes, codebooks, scales, bias)
    return x.new_empty(x.shape[0], codes.shape[0])


@torch.library.custom_op("codegemm::dequant_dense_mm", mutates_args=())
def dequant_dense_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Prefill: dequantize to a temporary dense ``W`` in ``x``'s dtype (Triton), then ``F.linear`` (cuBLAS)."""
    check_matmul_args(x, codes, codebooks, scales, bias)
    x, codes, codebooks, scales, bias = _contiguous(x, codes, codebooks, scales, bias)
    return dequant_dense_matmul(x, codes, codebooks, scales, bias)


@dequant_dense_mm.register_fake
def _dequant_dense_mm_fake(x, codes, codebooks, scales, bias=None):
    check_matmul_args(x, codes, codebooks, scales, bias)
    return x.new_empty(x.shape[0], codes.shape[0])


def _psumbook_gpu(x, codes, codebooks, scales, bias):
    """The CUDA C++ Psumbook kernel where the call fits it, else the Triton one."""
    if cuda_psumbook_eligible(x, codes, codebooks, scales, bias):
        return psumbook_matmul_cuda(x, codes, codebooks, scales, bias)
    return psumbook_matmul_triton(x, codes, codebooks, scales, bias)


@torch.library.custom_op("codegemm::psumbook_cuda_mm", mutates_args=())
def psumbook_cuda_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CUDA C++ Psumbook kernel for 1-16 tokens; calls it does not fit go to the Triton Psumbook kernel."""
    check_matmul_args(x, codes, codebooks, scales, bias, (torch.uint8,))
    x, codes, codebooks, scales, bias = _contiguous(x, codes, codebooks, scales, bias)
    return _psumbook_gpu(x, codes, codebooks, scales, bias)


@psumbook_cuda_mm.register_fake
def _psumbook_cuda_mm_fake(x, codes, codebooks, scales, bias=None):
    check_matmul_args(x, codes, codebooks, scales, bias, (torch.uint8,))
    return x.new_empty(x.shape[0], codes.shape[0])


@torch.library.custom_op("codegemm::codebook_mma_mm", mutates_args=())
def codebook_mma_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CUDA C++ codebook tensor-core kernel for 1-16 tokens; calls it does not fit go to the Psumbook kernels."""
    check_matmul_args(x, codes, codebooks, scales, bias, (torch.uint8,))
    x, codes, codebooks, scales, bias = _contiguous(x, codes, codebooks, scales, bias)
    if codebook_mma_eligible(x, codes, codebooks, scales, bias):
        return codebook_mma_cuda(x, codes, codebooks, scales, bias)
    return _psumbook_gpu(x, codes, codebooks, scales, bias)


@codebook_mma_mm.register_fake
def _codebook_mma_mm_fake(x, codes, codebooks, scales, bias=None):
    check_matmul_args(x, codes, codebooks, scales, bias, (torch.uint8,))
    return x.new_empty(x.shape[0], codes.shape[0])
