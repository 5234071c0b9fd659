"""psumbook_mma.cu on the device (``-m gpu``): the four-token Psumbook summed on the tensor cores, which serves 2-4
fp16 tokens on tiled tables. Against the float64 reference on the sweep and benchmark shapes, every plan, bias,
determinism, sibling layers in one launch, and activations large enough that an unscaled fp16 Psumbook overflows."""

from __future__ import annotations

import pytest
import torch
from helpers import CUDA_SWEEP_CONFIGS, CUDA_SWEEP_SHAPES, rel_error, seeded_cuda_layer, sweep_config

from codegemm import CodebookConfig, reference
from codegemm.layout import tile_tables
from codegemm.ops.cuda import codebook_mma_cuda, codebook_mma_eligible, grouped_mma_cuda, psumbook_mma_fits
from codegemm.shapes import DECODER_BLOCKS

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
BENCH_SHAPES = sorted({(s.in_features, s.out_features) for m in ("llama3-8b", "llama3-70b") for s in DECODER_BLOCKS[m]})


_layer = seeded_cuda_layer


@pytest.mark.parametrize("name", CUDA_SWEEP_CONFIGS)
@pytest.mark.parametrize("n,k", CUDA_SWEEP_SHAPES)
def test_every_token_count_and_plan_within_1e3(name, n, k):
    config = sweep_config(name, k)
    rows = _layer(config, n, k)
    tiled = tile_tables(*rows)
    for tokens in range(1, 5):  # (4, 1): blocks of four chunks, both Psumbook buffers
        x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float16)
        bias = torch.randn(n, device=DEVICE, dtype=torch.float16) if tokens % 2 else None
        assert codebook_mma_eligible(x, *tiled, bias, tiled=True) and psumbook_mma_fits(x, True)
        ref = reference.dense_matmul(x, *rows, bias, torch.float64)
        for tiles, splits in [(None, None), (1, 1), (2, 3), (4, 1), (4, 100), (1, None), (4, None)]:
            out = codebook_mma_cuda(x, *tiled, bias, tiles, splits, tiled=True, psumbook=True)
            assert rel_error(out, ref) <= 1e-3, (tokens, tiles, splits, rel_error(out, ref))
            again = codebook_mma_cuda(x, *tiled, bias, tiles, splits, tiled=True, psumbook=True)
            assert torch.equal(out, again), (tokens, tiles, splits)


@pytest.mark.parametrize("k,n", BENCH_SHAPES)
@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128"])
def test_benchmark_shapes_within_1e3(k, n, name):
    config = CodebookConfig.from_name(name)
    rows = _layer(config, n, k)
    tiled = tile_tables(*rows)
    for tokens in (2, 3, 4):
        x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float16)
        out = codebook_mma_cuda(x, *tiled, None, tiled=True)
        err = rel_error(out, reference.dense_matmul(x, *rows, None, torch.float64))
        assert err <= 1e-3, f"{name} {k}x{n} tokens={tokens}: relative error {err:.2e}"


@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128"])
def test_large_activations_do_not_overflow_the_fp16_psumbook(name):
    """Centroids up to ~100 and activations up to ~2000 make entries far past fp16's 65504; the block's
    power-of-two centroid factor keeps them in range, and the outputs match the reference."""
    config = CodebookConfig.from_name(name)
    rows = _layer(config, 2048, 1024, centroid_scale=25.0, scale=1e-5)
    tiled = tile_tables(*rows)
    x = torch.randn(4, 1024, device=DEVICE, dtype=torch.float16) * 500
    ref = reference.dense_matmul(x, *rows, None, torch.float64)
    assert ref.abs().max() < 6e4
    centroid_bound = rows[1].float().abs().amax() * x.float().abs().amax() * config.vec_len
    assert centroid_bound > 65504  # an unscaled entry could overflow
    out = codebook_mma_cuda(x, *tiled, None, tiled=True, psumbook=True)
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) <= 1e-3


@pytest.mark.parametrize("sizes,k", [((4096, 1024, 1024), 4096), ((2048, 1024), 2048)])
def test_sibling_layers_in_one_launch(sizes, k):
    config = CodebookConfig.from_name("m2v8g128")
    rows = [_layer(config, n, k, seed=i) for i, n in enumerate(sizes)]
    tiled = [tile_tables(*layer) for layer in rows]
    x = torch.randn(3, k, device=DEVICE, dtype=torch.float16)
    bias = torch.randn(sum(sizes), device=DEVICE, dtype=torch.float16)
    out = grouped_mma_cuda(x, tiled, bias, tiled=True, psumbook=True)
    ref = torch.cat([reference.dense_matmul(x, *layer, b, torch.float64)
                     for layer, b in zip(rows, bias.split(list(sizes)))], dim=1)
    assert rel_error(out, ref) <= 1e-3
