"""Triton kernels on the CPU interpreter (TRITON_INTERPRET=1): small shapes, a sweep of configs and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_quantized, rel_error, triton_device

DEVICE = triton_device()  # skips the module before the Triton imports below when Triton can't run

from codegemm import CodebookConfig, CodeGEMMLinear, DTypeError, ShapeError, reference
from codegemm.ops import custom_ops
from codegemm.ops.dispatch import Backend, codebook_matmul, select_kernel
from codegemm.ops.triton_dequant import dequant_matmul_triton
from codegemm.ops.triton_psumbook import plan_psumbook, psumbook_matmul_triton

# (config, out_features N, in_features K): odd N, K a multiple of g (or v) that is not a power of two
CASES = [
    ("m1v4g128", 37, 384),
    ("m2v8g128", 53, 384),
    ("m2v8", 29, 120),
    ("m3b6v8g24", 41, 144),
    ("m4b4v4g32", 19, 96),
    ("m2b5v16g48", 23, 96),
    ("m1b8v16g16", 31, 80),
    ("m2b3v4g8", 45, 72),
    ("m3b8v4", 17, 52),
    ("m4b8v8g64", 33, 192),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _layer_tensors(name: str, n: int, k: int, dtype: torch.dtype, bias: bool, tokens: int):
    config = CodebookConfig.from_name(name)
    codes, codebooks, scales = random_quantized(config, n, k, torch.float16, DEVICE)
    codes = codes.to(config.code_dtype)
    scales = scales * 0.05
    x = torch.randn(tokens, k, dtype=dtype, device=DEVICE)
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    return config, x, codes, codebooks, scales, b


def _tolerance(x, codes, codebooks, scales, bias, ref) -> float:
    """Twice the error of the same-precision PyTorch matmul of the dequantized weight."""
    if x.dtype == torch.float32:
        return 1e-5
    weight = reference.dequantize(codes, codebooks, scales, torch.float64).to(x.dtype)
    torch_path = F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return 2 * rel_error(torch_path, ref) + 1e-6


def _check(out, x, codes, codebooks, scales, bias):
    ref = reference.psumbook_matmul(x.cpu(), codes.cpu(), codebooks.cpu(), scales.cpu(), None if bias is None else bias.cpu())
    assert out.dtype == x.dtype and out.shape == (x.shape[0], codes.shape[0])
    assert torch.isfinite(out).all()
    err = rel_error(out.cpu(), ref)
    tol = _tolerance(x.cpu(), codes.cpu(), codebooks.cpu(), scales.cpu(), None if bias is None else bias.cpu(), ref)
    assert err <= tol, f"relative error {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("name,n,k", CASES)
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_psumbook_sweep(name, n, k, tokens):
    dtype = DTYPES[(len(name) + tokens) % 3]
    bias = (n + tokens) % 2 == 0
    _, x, codes, codebooks, scales, b = _layer_tensors(name, n, k, dtype, bias, tokens)
    _check(custom_ops.psumbook_mm(x, codes, codebooks, scales, b), x, codes, codebooks, scales, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_psumbook_dtypes_and_bias(dtype, bias):
    _, x, codes, codebooks, scales, b = _layer_tensors("m2v8g128", 61, 256, dtype, bias, 5)
    _check(custom_ops.psumbook_mm(x, codes, codebooks, scales, b), x, codes, codebooks, scales, b)


@pytest.mark.parametrize("split_k", [1, 2, 3, 7])
@pytest.mark.parametrize("block_n", [16, 64])
def test_psumbook_split_k_and_tiles(split_k, block_n):
    """Every split count and row tile gives the same function; splits are summed in fixed order."""
    _config, x, codes, codebooks, scales, b = _layer_tensors("m2v8g32", 45, 224, torch.float16, True, 3)
    plan = plan_psumbook(3, 45, 224 // 8, 2, 256, 4, x.device, block_n=block_n, split_k=split_k)
    out = psumbook_matmul_triton(x, codes, codebooks, scales, b, plan)
    _check(out, x, codes, codebooks, scales, b)
    assert torch.equal(out, psumbook_matmul_triton(x, codes, codebooks, scales, b, plan))


@pytest.mark.parametrize("name,n,k", CASES[::2])
@pytest.mark.parametrize("tokens", [17, 53])
def test_dequant_gemm_sweep(name, n, k, tokens):
    dtype = DTYPES[(len(name) + tokens) % 3]
    _, x, codes, codebooks, scales, b = _layer_tensors(name, n, k, dtype, tokens == 53, tokens)
    _check(custom_ops.dequant_mm(x, codes, codebooks, scales, b), x, codes, codebooks, scales, b)


@pytest.mark.parametrize("tokens", [1, 16])
def test_dequant_gemm_small_batches(tokens):
    _, x, codes, codebooks, scales, b = _layer_tensors("m2v8g128", 40, 256, torch.float16, False, tokens)
    _check(dequant_matmul_triton(x, codes, codebooks, scales, b), x, codes, codebooks, scales, b)


def test_identity_input_gives_dequantized_weight():
    """x = I isolates layout bugs: the output is W.T exactly up to fp32 accumulation."""
    _config, _, codes, codebooks, scales, _ = _layer_tensors("m2v8g32", 24, 64, torch.float32, False, 1)
    weight = reference.dequantize(codes, codebooks, scales, torch.float64)
    for k0 in (0, 16, 48):
        eye = torch.eye(64, dtype=torch.float32, device=DEVICE)[k0 : k0 + 16]
        out = custom_ops.psumbook_mm(eye, codes, codebooks, scales, None)
        torch.testing.assert_close(out.double().cpu(), weight[:, k0 : k0 + 16].T.cpu(), rtol=1e-6, atol=1e-6)


def test_dispatch_routes_by_token_count():
    config = CodebookConfig.from_name("m2v8g128")
    device = torch.device(DEVICE)
    assert select_kernel(device, config, 16, torch.float16, Backend.TRITON).fn.__name__ == "_psumbook"
    assert select_kernel(device, config, 17, torch.float16, Backend.TRITON).fn.__name__ == "_dequant"
    wide = CodebookConfig.from_name("m1b12v8g128")
    assert select_kernel(device, wide, 1, torch.bfloat16, Backend.TRITON).fn.__name__ == "_dequant"
    if device.type == "cpu":
        assert select_kernel(device, config, 1, torch.float16).backend is not Backend.TRITON


@pytest.mark.parametrize("tokens", [1, 3, 53])
def test_layer_with_triton_backend(tokens):
    _config, x, codes, codebooks, scales, b = _layer_tensors("m2v8g64", 36, 128, torch.float16, True, tokens)
    layer = CodeGEMMLinear.from_unpacked(codes, codebooks, scales, b)
    layer.backend = Backend.TRITON
    x3 = x.reshape(1, tokens, 128)
    out = layer(x3)
    assert out.shape == (1, tokens, 36)
    _check(out.reshape(tokens, 36), x, codes, codebooks, scales, b)


def test_noncontiguous_activations_give_correct_result():
    config, _x, codes, codebooks, scales, _b = _layer_tensors("m2v8g64", 36, 128, torch.float16, False, 4)
    wide = torch.randn(4, 256, dtype=torch.float16, device=DEVICE)
    x_nc = wide[:, ::2]
    assert not x_nc.is_contiguous()
    out = codebook_matmul(x_nc, codes, codebooks, scales, None, config, Backend.TRITON)
    _check(out, x_nc.contiguous(), codes, codebooks, scales, None)


def test_bad_input_raises_typed_errors():
    _config, x, codes, codebooks, scales, _b = _layer_tensors("m2v8g64", 36, 128, torch.float16, False, 2)
    with pytest.raises(ShapeError, match="in_features=128"):
        custom_ops.psumbook_mm(x[:, :64], codes, codebooks, scales, None)
    with pytest.raises(DTypeError, match="codes"):
        custom_ops.psumbook_mm(x, codes.to(torch.int32), codebooks, scales, None)
    with pytest.raises(DTypeError, match="x must be"):
        custom_ops.dequant_mm(x.double(), codes, codebooks, scales, None)
    with pytest.raises(ShapeError, match="scales"):
        custom_ops.dequant_mm(x, codes, codebooks, scales[:, :1].repeat(1, 3), None)
    with pytest.raises(ShapeError, match="bias"):
        custom_ops.psumbook_mm(x, codes, codebooks, scales, torch.randn(35, dtype=torch.float16, device=DEVICE))


@pytest.mark.parametrize("op", ["psumbook_mm", "dequant_mm"])
def test_opcheck(op):
    _, x, codes, codebooks, scales, b = _layer_tensors("m2v8g32", 20, 64, torch.float16, True, 2)
    torch.library.opcheck(getattr(torch.ops.codegemm, op).default, (x, codes, codebooks, scales, b))


def test_fullgraph_compile_traces_the_custom_op():
    _config, x, codes, codebooks, scales, b = _layer_tensors("m2v8g32", 20, 64, torch.float16, True, 3)
    fn = torch.compile(lambda t: custom_ops.psumbook_mm(t, codes, codebooks, scales, b) * 2, fullgraph=True,
                       backend="eager")
    torch.testing.assert_close(fn(x), 2 * custom_ops.psumbook_mm(x, codes, codebooks, scales, b))
