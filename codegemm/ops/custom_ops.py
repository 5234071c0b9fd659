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
from codegemm.ops.cuda import cuda_psumbook_eligible, psumbook_matmul_cuda
from codegemm.ops.triton_dequant import dequant_matmul_triton
from codegemm.ops.triton_dequant_dense import dequant_dense_matmul
from codegemm.ops.triton_psumbook import psumbook_matmul_triton

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CODE_DTYPES = (torch.uint8, torch.int16, torch.int32)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_matmul_args(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    code_dtypes: tuple[torch.dtype, ...] = _CODE_DTYPES,
) -> None:
    """Raise ShapeError/DTypeError unless the tensors describe one valid layer call (metadata only)."""
    if x.dim() != 2:
        raise ShapeError(f"x must have shape (tokens, in_features); got rank {x.dim()} {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise DTypeError(f"x must be float16, bfloat16 or float32 for the Triton kernels; got {x.dtype}")
    if codes.dim() != 3:
        raise ShapeError(f"codes must have shape (out_features, in_features // vec_len, num_codebooks); "
                         f"got {tuple(codes.shape)}")
    if codes.dtype not in code_dtypes:
        raise DTypeError(f"codes must have dtype in {[str(d) for d in code_dtypes]}; got {codes.dtype}")
    if codebooks.dim() != 3 or codebooks.dtype not in _FLOAT_DTYPES:
        raise ShapeError(f"codebooks must be a float16/bfloat16/float32 tensor (num_codebooks, 2**nbits, vec_len); "
                         f"got {codebooks.dtype} {tuple(codebooks.shape)}")
    n, num_vectors, m = codes.shape
    if codebooks.shape[0] != m:
        raise ShapeError(f"codebooks must have num_codebooks={m} (codes.shape[2]) entries; "
                         f"got {tuple(codebooks.shape)}")
    k = num_vectors * codebooks.shape[2]
    if x.shape[1] != k:
        raise ShapeError(f"x must have in_features={k} (codes.shape[1] * vec_len) columns; got {tuple(x.shape)}")
    if scales.dim() != 2 or scales.dtype not in _FLOAT_DTYPES or scales.shape[0] != n or scales.shape[1] == 0:
        raise ShapeError(f"scales must be a float tensor (out_features={n}, in_features // group_size); "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    if num_vectors % scales.shape[1]:
        raise ShapeError(f"scales.shape[1]={scales.shape[1]} must divide the {num_vectors} vectors of a row "
                         f"(group_size a multiple of vec_len)")
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
    if cuda_psumbook_eligible(x, codes, codebooks, scales, bias):
        return psumbook_matmul_cuda(x, codes, codebooks, scales, bias)
    return psumbook_matmul_triton(x, codes, codebooks, scales, bias)


@psumbook_cuda_mm.register_fake
def _psumbook_cuda_mm_fake(x, codes, codebooks, scales, bias=None):
    check_matmul_args(x, codes, codebooks, scales, bias, (torch.uint8,))
    return x.new_empty(x.shape[0], codes.shape[0])
