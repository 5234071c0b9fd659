"""Prefill path (Triton dequantization to a dense weight + F.linear) on the CPU interpreter: small shapes."""

from __future__ import annotations

import pytest
import torch
from helpers import random_quantized, rel_error, triton_device

DEVICE = triton_device()  # skips the module before the Triton imports below when Triton can't run

from codegemm import CodebookConfig, DTypeError, ShapeError, reference
from codegemm.ops import custom_ops
from codegemm.ops.dispatch import Backend, codebook_matmul, select_kernel
from codegemm.ops.triton_dequant_dense import dequantize_triton

# (config, N, K): m 1-4, b 2-8 (and one wide code), v 2/4/8/16 (and 1, 3), group sizes, per-row scales, odd N, K
CASES = [
    ("m1v4g128", 37, 384),
    ("m2v8g128", 53, 384),
    ("m2v8", 29, 120),
    ("m3b6v8g24", 41, 144),
    ("m4b4v4g32", 19, 160),
    ("m2b5v16g48", 23, 96),
    ("m1b8v16g16", 31, 80),
    ("m2b3v4g8", 45, 72),
    ("m3b8v4", 17, 52),
    ("m4b2v2g6", 13, 42),
    ("m1b2v2", 11, 34),
    ("m1b12v8g64", 9, 128),
    ("m2b4v1", 7, 37),
    ("m1b4v3g9", 5, 45),
]
DTYPES = [torch.float16, torch.bfloat16]


def _layer(name: str, n: int, k: int, book_dtype: torch.dtype = torch.float16):
    config = CodebookConfig.from_name(name)
    codes, codebooks, scales = random_quantized(config, n, k, book_dtype, DEVICE)
    return config, codes.to(config.code_dtype), codebooks, scales * 0.05


def _ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each value of ``ref`` (the subnormal step near zero)."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(ref.double())
    return torch.clamp(torch.ldexp(torch.full_like(ref, info.eps, dtype=torch.float64), exponent - 1),
                       min=info.smallest_normal * info.eps)


def _assert_within_one_rounding(weight: torch.Tensor, codes, codebooks, scales, dtype) -> None:
    """The reference summed in fp32 and cast once; the kernel may round the cast differently by one ulp."""
    ref32 = reference.dequantize(codes.cpu(), codebooks.cpu(), scales.cpu(), torch.float32)
    assert weight.dtype == dtype and weight.shape == ref32.shape
    diff = (weight.cpu().double() - ref32.to(dtype).double()).abs()
    assert (diff <= _ulp(ref32, dtype)).all(), f"max difference {diff.max().item():.3e}"


@pytest.mark.parametrize("name,n,k", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantized_weight_within_one_rounding(name, n, k, dtype):
    _config, codes, codebooks, scales = _layer(name, n, k)
    _assert_within_one_rounding(dequantize_triton(codes, codebooks, scales, dtype), codes, codebooks, scales, dtype)


@pytest.mark.parametrize("book_dtype", [torch.bfloat16, torch.float32])
def test_codebook_and_scale_dtypes(book_dtype):
    _config, codes, codebooks, scales = _layer("m2v8g32", 21, 96, book_dtype)
    for dtype in (torch.float16, torch.float32):
        weight = dequantize_triton(codes, codebooks, scales, dtype)
        _assert_within_one_rounding(weight, codes, codebooks, scales, dtype)


def test_tiles_do_not_change_the_weight():
    _config, codes, codebooks, scales = _layer("m2v4g16", 50, 208)
    base = dequantize_triton(codes, codebooks, scales, torch.float16)
    for block_n, block_k in ((4, 32), (8, 64), (64, 1024)):
        assert torch.equal(base, dequantize_triton(codes, codebooks, scales, torch.float16, block_n, block_k))


def test_out_of_range_codes_stay_inside_the_codebook():
    _config, _codes, codebooks, scales = _layer("m2b4v8g32", 12, 64)
    bad = torch.randint(0, 256, (12, 8, 2), dtype=torch.uint8, device=DEVICE)
    weight = dequantize_triton(bad, codebooks, scales, torch.float16)
    _assert_within_one_rounding(weight, bad & 15, codebooks, scales, torch.float16)


def test_dequantize_rejects_bad_input():
    _config, codes, codebooks, scales = _layer("m2v8g32", 8, 64)
    with pytest.raises(DTypeError, match="dtype"):
        dequantize_triton(codes, codebooks, scales, torch.float64)
    with pytest.raises(DTypeError, match="codes"):
        dequantize_triton(codes.float(), codebooks, scales, torch.float16)
    with pytest.raises(ShapeError, match="codebooks"):
        dequantize_triton(codes, codebooks[:1], scales, torch.float16)
    with pytest.raises(ShapeError, match="scales"):
        dequantize_triton(codes, codebooks, scales[:, :1].repeat(1, 3), torch.float16)


def _dense_spec(tokens: int, dtype: torch.dtype):
    """The prefill kernel, forced: ``backend='cuda'`` (its matmul is cuBLAS); AUTO on CUDA picks it too."""
    spec = select_kernel(torch.device(DEVICE), CodebookConfig.from_name("m2v8g64"), tokens, dtype, Backend.CUDA)
    assert spec.name.startswith("dequant_dense")
    return spec


@pytest.mark.parametrize("tokens", [17, 53])
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_through_the_dispatcher(tokens, dtype):
    config, codes, codebooks, scales = _layer("m3b6v8g24", 27, 168)
    x = torch.randn(tokens, 168, dtype=dtype, device=DEVICE)
    bias = torch.randn(27, dtype=dtype, device=DEVICE) if tokens == 53 else None
    _dense_spec(tokens, dtype)
    out = codebook_matmul(x, codes, codebooks, scales, bias, config, Backend.CUDA)
    assert out.dtype == dtype and out.shape == (tokens, 27)
    cpu = lambda t: None if t is None else t.cpu()
    ref = reference.dense_matmul(x.cpu(), codes.cpu(), codebooks.cpu(), scales.cpu(), cpu(bias), torch.float64)
    weight = reference.dequantize(codes.cpu(), codebooks.cpu(), scales.cpu(), torch.float32).to(dtype)
    torch_err = rel_error(torch.nn.functional.linear(x.cpu(), weight, cpu(bias)), ref)
    assert rel_error(out.cpu(), ref) <= 2 * torch_err + 1e-6


def test_routing_keeps_the_fused_gemm_reachable():
    device, config = torch.device(DEVICE), CodebookConfig.from_name("m2v8g128")
    assert select_kernel(device, config, 17, torch.float16, Backend.TRITON).name.startswith("triton_dequant_gemm")
    assert _dense_spec(17, torch.float16).backend is Backend.CUDA
    if device.type == "cuda":
        assert select_kernel(device, config, 17, torch.float16).name == "cuda_sliced"
        assert select_kernel(device, config, 65, torch.float16).name == "dequant_dense"
        assert select_kernel(device, config, 16, torch.float16).name == "cuda_psumbook"
    else:
        assert select_kernel(device, config, 17, torch.float16).backend is Backend.CPU


def test_opcheck_and_fake():
    _config, codes, codebooks, scales = _layer("m2v8g32", 20, 64)
    x = torch.randn(17, 64, dtype=torch.float16, device=DEVICE)
    bias = torch.randn(20, dtype=torch.float16, device=DEVICE)
    torch.library.opcheck(torch.ops.codegemm.dequant_dense_mm.default, (x, codes, codebooks, scales, bias))
    with pytest.raises(ShapeError, match="in_features=64"):
        custom_ops.dequant_dense_mm(x[:, :32], codes, codebooks, scales, None)
