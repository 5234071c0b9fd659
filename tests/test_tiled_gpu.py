"""The tiled GPU layout on the device (``-m gpu``): every CUDA kernel gives bit for bit what it gives on the
row-major tables (same summation order, only the addresses differ), through the module and dispatcher too,
under ``torch.compile(fullgraph=True)`` and CUDA-graph capture. The one kernel that reads only tiled tables
(psumbook_mma.cu: 2-4 fp16 tokens) is held to the float64 reference instead, here where the dispatcher picks it
and in tests/test_psumbook_mma_gpu.py."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CUDA_SWEEP_CONFIGS,
    CUDA_SWEEP_SHAPES,
    assert_compiled_graph_matches_eager,
    rel_error,
    seeded_cuda_layer,
    sweep_config,
    tiny_llama_config,
)

from codegemm import CodebookConfig, CodeGEMMLinear, reference
from codegemm.layout import tile_tables
from codegemm.ops.cuda import (
    codebook_mma_cuda,
    codebook_mma_eligible,
    cuda_dequant_eligible,
    cuda_psumbook_eligible,
    dequantize_cuda,
    psumbook_matmul_cuda,
    psumbook_mma_chosen,
    token_slices,
)
from codegemm.ops.dispatch import grouped_matmul
from codegemm.random_model import build_random_quantized_model
from codegemm.surgery import quantized_modules
from codegemm.tiling import tile_for_gpu

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")


_layer = seeded_cuda_layer


@pytest.mark.parametrize("name", CUDA_SWEEP_CONFIGS)
@pytest.mark.parametrize("n,k", CUDA_SWEEP_SHAPES)
def test_cuda_kernels_bit_identical_on_tiled_tables(name, n, k):
    config = sweep_config(name, k)
    rows = _layer(config, n, k)
    tiled = tile_tables(*rows)
    for tokens in range(1, 17):
        dtype = torch.float16 if tokens % 2 else torch.bfloat16
        x = torch.randn(tokens, k, device=DEVICE, dtype=dtype)
        bias = torch.randn(n, device=DEVICE, dtype=dtype) if tokens % 3 else None
        assert cuda_psumbook_eligible(x, *tiled, bias, tiled=True)
        for rpt, splits in [(None, None), (8, 1), (2, 3)]:
            want = psumbook_matmul_cuda(x, *rows, bias, rpt, splits)
            assert torch.equal(psumbook_matmul_cuda(x, *tiled, bias, rpt, splits, tiled=True), want), (tokens, rpt)
        assert codebook_mma_eligible(x, *tiled, bias, tiled=True)
        for tiles, splits in [(None, None), (2, 3)]:
            want = codebook_mma_cuda(x, *rows, bias, tiles, splits)
            got = codebook_mma_cuda(x, *tiled, bias, tiles, splits, tiled=True, psumbook=False)
            assert torch.equal(got, want), (tokens, tiles)
    for dtype in (torch.float16, torch.bfloat16):
        assert cuda_dequant_eligible(*tiled, dtype, tiled=True)
        assert torch.equal(dequantize_cuda(*tiled, dtype, tiled=True), dequantize_cuda(*rows, dtype))


@pytest.mark.parametrize("sizes,k", [((4096, 1024, 1024), 4096), ((2048, 1024), 2048), ((1024, 256, 256), 1024)])
@pytest.mark.parametrize("tokens", [1, 2, 16])
def test_grouped_kernels_bit_identical_on_tiled_tables(sizes, k, tokens):
    config = CodebookConfig.from_name("m2v8g128")
    rows = [_layer(config, n, k, seed=i) for i, n in enumerate(sizes)]
    tiled = [tile_tables(*layer) for layer in rows]
    x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float16)
    bias = torch.randn(sum(sizes), device=DEVICE, dtype=torch.float16)
    # the grouped Psumbook kernel for one token, the grouped tensor-core kernel for more; one launch per layer
    # where the sizes are off the block boundaries (1024, 256, 256)
    want = grouped_matmul(x, rows, bias, config)
    got = grouped_matmul(x, tiled, bias, config, tiled=True)
    if psumbook_mma_chosen(x, tiled[0][1], True):  # tiled only: the float64 reference instead
        ref = torch.cat([reference.dense_matmul(x, *layer, b, torch.float64)
                         for layer, b in zip(rows, bias.split(list(sizes)))], dim=1)
        assert rel_error(got, ref) <= 1e-3
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("tokens", [1, 2, 16, 17, 64])
def test_tiled_module_matches_row_major_module(tokens):
    config = CodebookConfig.from_name("m2v8g128")
    codes, codebooks, scales = _layer(config, 3072, 1024)
    bias = torch.randn(3072, device=DEVICE, dtype=torch.float16)
    layer = CodeGEMMLinear.from_unpacked(codes, codebooks, scales, bias, config)
    x = torch.randn(tokens, 1024, device=DEVICE, dtype=torch.float16)
    with torch.no_grad():
        want = layer(x)
        got = layer.tile_()(x)
    if any(psumbook_mma_chosen(x[a:b], codebooks, True) for a, b in token_slices(tokens)):  # tiled only: float64
        assert rel_error(got, reference.dense_matmul(x, codes, codebooks, scales, bias, torch.float64)) <= 1e-3
    else:
        assert torch.equal(got, want)


def test_tile_for_gpu_tiles_what_the_cuda_kernels_read():
    model = build_random_quantized_model(tiny_llama_config(hidden_size=256, intermediate_size=512), "m2v8g128",
                                         device=DEVICE, dtype=torch.float16, seed=0)
    layers = [layer for _, layer in quantized_modules(model)]
    assert tile_for_gpu(model) == len(layers) and all(layer.tiled for layer in layers)
    # m4v8 tiles, but no CUDA kernel reads it: its layers stay row-major
    other = build_random_quantized_model(tiny_llama_config(), "m4b8v8g64", device=DEVICE, dtype=torch.float16)
    assert tile_for_gpu(other) == 0


@pytest.mark.parametrize("tokens", [1, 3])  # 3: psumbook_mma.cu
def test_compiled_graph_of_tiled_layers(tokens):
    config = CodebookConfig.from_name("m2v8g128")
    up = CodeGEMMLinear.from_unpacked(*_layer(config, 2048, 512, seed=1), config=config).tile_()
    down = CodeGEMMLinear.from_unpacked(*_layer(config, 512, 2048, seed=2), config=config).tile_()
    model = torch.nn.Sequential(up, torch.nn.SiLU(), down).eval()
    assert_compiled_graph_matches_eager(model, torch.randn(tokens, 512, device=DEVICE, dtype=torch.float16))
