"""The CUDA grouped kernels (sibling layers in one launch) on the device (``-m gpu``).

Each sibling keeps its own codes, codebooks and scales; the grouped launch must equal every layer's own
float64 reference, be deterministic, reject misaligned segments by falling back, and work in a compiled,
CUDA-graph-captured decode step of a real transformers model.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_grouped_decode_matches_separate, rel_error

from codegemm import CodebookConfig, reference
from codegemm.ops.cuda import grouped_eligible, psumbook_rows_per_block
from codegemm.ops.dispatch import codebook_matmul, grouped_matmul

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")


def _layers(config: CodebookConfig, sizes, k: int, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    out = []
    for n in sizes:
        codes = torch.randint(0, 256, (n, k // config.vec_len, config.num_codebooks), device=DEVICE,
                              generator=gen, dtype=torch.int32).to(torch.uint8)
        codebooks = torch.randn(config.num_codebooks, 256, config.vec_len, device=DEVICE, generator=gen).half()
        scales = (0.5 + torch.rand(n, config.num_groups(k), device=DEVICE, generator=gen)).mul_(0.02).half()
        out.append((codes, codebooks, scales))
    return out


def _reference(x, layers, bias):
    ref = torch.cat([reference.dense_matmul(x, *layer, None, torch.float64) for layer in layers], dim=1)
    return ref if bias is None else ref + bias.double()


@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128"])
@pytest.mark.parametrize("sizes,k", [((4096, 1024, 1024), 4096), ((14336, 14336), 4096), ((8192, 1024, 1024), 8192),
                                     ((2048, 1024), 2048), ((1024, 256, 256), 1024), ((1000, 24), 512)])
@pytest.mark.parametrize("tokens", [1, 2, 4, 9, 16, 17, 40])  # 17, 40: slices of at most 16 tokens
def test_grouped_equals_each_layer_within_1e3(name, sizes, k, tokens):
    config = CodebookConfig.from_name(name)
    layers = _layers(config, sizes, k, seed=tokens)
    x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float16)
    out = grouped_matmul(x, layers, None, config)
    assert out is not None and out.shape == (tokens, sum(sizes)) and out.dtype == torch.float16
    err = rel_error(out, _reference(x, layers, None))
    assert err <= 1e-3, f"{name} {sizes}x{k} tokens={tokens}: relative error {err:.2e}"
    alone = torch.cat([codebook_matmul(x, *layer, None, config) for layer in layers], dim=1)
    assert rel_error(out, alone.double()) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 16, 33])
def test_grouped_bias_dtype_and_determinism(dtype, tokens):
    config = CodebookConfig.from_name("m2v8g128")
    layers = _layers(config, (4096, 1024, 1024), 4096, seed=7)
    x = torch.randn(tokens, 4096, device=DEVICE, dtype=dtype)
    bias = torch.randn(6144, device=DEVICE, dtype=dtype)
    first = grouped_matmul(x, layers, bias, config)
    ref = _reference(x, layers, bias)
    bound = 1e-3
    if dtype == torch.bfloat16:  # the bar: within 2x a bf16 matmul of the dequantized weight
        weight = torch.cat([reference.dequantize(*layer, torch.float64) for layer in layers])
        bound = 2 * rel_error(torch.nn.functional.linear(x, weight.to(dtype), bias), ref)
    assert first.dtype == dtype and rel_error(first, ref) <= bound
    for _ in range(3):
        assert torch.equal(first, grouped_matmul(x, layers, bias, config))


def test_misaligned_groups_fall_back_to_one_launch_per_layer():
    config = CodebookConfig.from_name("m2v8g128")
    layers = _layers(config, (640, 128, 128), 1024)
    x = torch.randn(1, 1024, device=DEVICE, dtype=torch.float16)
    assert not grouped_eligible(x, layers, None, psumbook_rows_per_block(1, 4))
    out = grouped_matmul(x, layers, None, config)
    assert rel_error(out, _reference(x, layers, None)) <= 1e-3


def test_compiled_graph_decode_grouped_equals_separate():
    model = assert_grouped_decode_matches_separate(seed=2)
    assert any(getattr(m, "_siblings", None) is not None for m in model.modules())
