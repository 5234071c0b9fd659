"""Checks of the quantized tensors, shared by the layer constructor and the checkpoint loader."""

from __future__ import annotations

import torch

from codegemm.config import CodebookConfig
from codegemm.errors import DTypeError, RangeError, ShapeError

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def expected_shapes(config: CodebookConfig, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    """Shapes of ``codes``, ``codebooks`` and ``scales`` for one layer (see :mod:`codegemm.layout`)."""
    return {
        "codes": (out_features, in_features // config.vec_len, config.num_codebooks),
        "codebooks": (config.num_codebooks, config.codebook_size, config.vec_len),
        "scales": (out_features, config.num_groups(in_features)),
    }


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], what: str = "") -> None:
    if tuple(tensor.shape) != tuple(shape):
        hint = f" ({what})" if what else ""
        raise ShapeError(f"{name} must have shape {tuple(shape)}{hint}; got {tuple(tensor.shape)}")


def check_codes(name: str, codes: torch.Tensor, config: CodebookConfig, check_range: bool = True) -> None:
    """Codes must be integers in ``[0, 2**nbits)``."""
    if not isinstance(codes, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor; got {type(codes).__name__}")
    if codes.dtype not in _INT_DTYPES:
        raise DTypeError(f"{name} must have an integer dtype (uint8/int16/int32/int64); got {codes.dtype}")
    if check_range and codes.numel() and codes.device.type != "meta":
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= config.codebook_size:
            raise RangeError(
                f"{name} must lie in [0, {config.codebook_size}) for nbits={config.nbits}; got values in [{lo}, {hi}]"
            )


def check_float(name: str, tensor: torch.Tensor, check_finite: bool = True) -> None:
    """Codebooks, scales and bias must be finite floating-point tensors."""
    if not isinstance(tensor, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise DTypeError(f"{name} must be float16, bfloat16, float32 or float64; got {tensor.dtype}")
    if check_finite and tensor.numel() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
        raise RangeError(f"{name} must be finite; it holds NaN or Inf")


def check_activations(x: torch.Tensor, in_features: int, name: str = "x") -> None:
    """Activations: floating point, last dimension ``in_features``."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise DTypeError(f"{name} must be float16, bfloat16, float32 or float64; got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ShapeError(f"{name} must have last dimension in_features={in_features}; got shape {tuple(x.shape)}")


KERNEL_CODE_DTYPES = (torch.uint8, torch.int16, torch.int32)
KERNEL_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_quantized_metadata(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    code_dtypes: tuple[torch.dtype, ...] = KERNEL_CODE_DTYPES,
) -> tuple[int, int, int]:
    """Kernel-entry checks of one layer's tensors from metadata alone (safe under fake tensors).

    Returns ``(out_features, in_features, num_codebooks)``. Values (code ranges,
    finiteness) are checked where layers are built, not on every call.
    """
    if codes.dim() != 3:
        raise ShapeError(
            f"codes must have shape (out_features, in_features // vec_len, num_codebooks); got {tuple(codes.shape)}"
        )
    if codes.dtype not in code_dtypes:
        raise DTypeError(f"codes must have dtype in {[str(d) for d in code_dtypes]}; got {codes.dtype}")
    n, num_vectors, m = codes.shape
    if codebooks.dim() != 3 or codebooks.dtype not in KERNEL_FLOAT_DTYPES or codebooks.shape[0] != m:
        raise ShapeError(
            f"codebooks must be a float16/bfloat16/float32 tensor (num_codebooks={m}, 2**nbits, vec_len); "
            f"got {codebooks.dtype} {tuple(codebooks.shape)}"
        )
    size = codebooks.shape[1]
    if size <= 0 or size & (size - 1):
        raise ShapeError(f"codebooks.shape[1] must be a power of two (2**nbits); got {size}")
    _check_scales_and_device(codes, codebooks, scales, n, num_vectors, tiled=False)
    return n, num_vectors * codebooks.shape[2], m


def _check_scales_and_device(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, n: int,
                             num_vectors: int, tiled: bool) -> None:
    """Scales ``[N, groups]`` (tiled: ``[groups, N]``) whose groups divide a row's vectors; one device."""
    name, rows_dim = ("tiled scales", 1) if tiled else ("scales", 0)
    groups_dim = 1 - rows_dim
    shape = f"(in_features // group_size, out_features={n})" if tiled else f"(out_features={n}, in_features // group_size)"
    if (scales.dim() != 2 or scales.dtype not in KERNEL_FLOAT_DTYPES or scales.shape[rows_dim] != n
            or scales.shape[groups_dim] == 0):
        raise ShapeError(f"{name} must be a float tensor {shape}; got {scales.dtype} {tuple(scales.shape)}")
    if num_vectors % scales.shape[groups_dim]:
        raise ShapeError(
            f"{name}.shape[{groups_dim}]={scales.shape[groups_dim]} must divide the {num_vectors} vectors of a row "
            f"(group_size a multiple of vec_len)"
        )
    if len({codes.device, codebooks.device, scales.device}) != 1:
        raise DTypeError(
            "codes, codebooks and scales must be on one device; "
            f"got {codes.device}, {codebooks.device}, {scales.device}"
        )


def check_tiled_metadata(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
) -> tuple[int, int, int]:
    """:func:`check_quantized_metadata` for the tiled layout (:mod:`codegemm.layout`): uint8 codes
    ``[chunks, N, 32]``, scales ``[K // g, N]``. Returns ``(out_features, in_features, num_codebooks)``."""
    if codes.dim() != 3 or codes.dtype != torch.uint8 or codes.shape[2] != 32:
        raise ShapeError(
            f"tiled codes must be a uint8 tensor (chunks, out_features, 32); got {codes.dtype} {tuple(codes.shape)}"
        )
    chunks, n, _ = codes.shape
    if codebooks.dim() != 3 or codebooks.dtype not in KERNEL_FLOAT_DTYPES or 32 % codebooks.shape[0]:
        raise ShapeError(
            "codebooks must be a float16/bfloat16/float32 tensor (num_codebooks dividing 32, 2**nbits, vec_len); "
            f"got {codebooks.dtype} {tuple(codebooks.shape)}"
        )
    m, _, v = codebooks.shape
    num_vectors = chunks * 32 // m
    _check_scales_and_device(codes, codebooks, scales, n, num_vectors, tiled=True)
    return n, num_vectors * v, m
