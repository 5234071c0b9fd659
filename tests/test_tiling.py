"""The tiled GPU layout (codegemm.layout): lossless round trips, a tiled layer computes what the row-major one
does on every path, checkpoints stay row-major, and tiled tensors are validated like row-major ones."""

from __future__ import annotations

import pytest
import torch
from helpers import random_quantized, tiny_llama_config
from torch import nn

from codegemm import CodebookConfig, CodeGEMMLinear, ShapeError
from codegemm.layout import TILE_CODE_XOR, can_tile, tile_codes, tile_scales, tile_tables, untile_codes, untile_scales
from codegemm.ops.dispatch import Backend, codebook_matmul, grouped_matmul
from codegemm.random_model import build_random_quantized_model
from codegemm.siblings import fuse_siblings
from codegemm.surgery import quantized_modules
from codegemm.tiling import tile_for_gpu, untile

TILEABLE = [("m2v8g128", 40, 256), ("m1v4g128", 24, 384), ("m4b8v8g64", 8, 128), ("m2v8", 17, 256)]


def _layer(name: str, n: int, k: int, dtype=torch.float16, bias=False) -> CodeGEMMLinear:
    config = CodebookConfig.from_name(name)
    codes, codebooks, scales = random_quantized(config, n, k, dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    return CodeGEMMLinear.from_unpacked(codes, codebooks, scales * 0.05, b, config)


@pytest.mark.parametrize("name,n,k", TILEABLE)
def test_round_trips_are_lossless(name, n, k):
    config = CodebookConfig.from_name(name)
    codes, codebooks, scales = random_quantized(config, n, k)
    codes = codes.to(torch.uint8)
    tiled, same_books, tiled_scales = tile_tables(codes, codebooks, scales)
    assert same_books is codebooks and torch.equal(tiled_scales, tile_scales(scales))
    assert tiled.shape == (k // config.vec_len * config.num_codebooks // 32, n, 32) and tiled.is_contiguous()
    # chunk c of row r is the row's code bytes 32c .. 32c + 31, byte s stored at s ^ (r % 16)
    stored = torch.arange(32) ^ (3 & TILE_CODE_XOR)
    assert torch.equal(tiled[1, 3, stored], codes[3].reshape(-1)[32:64])
    if n > 16:
        assert torch.equal(tiled[0, 16], codes[16].reshape(-1)[:32])
    assert torch.equal(untile_codes(tiled, config.num_codebooks), codes)
    assert torch.equal(untile_scales(tile_scales(scales)), scales)


def test_tiling_one_chunk_layer_leaves_its_codes_alone():
    """With one chunk per row the transposed view is the input itself: the byte swizzle must copy."""
    codes = torch.randint(0, 256, (20, 16, 2), dtype=torch.uint8)
    before = codes.clone()
    tiled = tile_codes(codes)
    assert torch.equal(codes, before) and tiled.data_ptr() != codes.data_ptr()
    assert torch.equal(tiled[0, 5, torch.arange(32) ^ 5], codes[5].reshape(-1))
    assert torch.equal(untile_codes(tiled, 2), codes)


def test_can_tile_needs_whole_chunks_and_8_bit_codes():
    assert can_tile(CodebookConfig.from_name("m2v8g128"), 4096)
    assert not can_tile(CodebookConfig.from_name("m2v8g128"), 64)  # half a chunk per row
    assert not can_tile(CodebookConfig.from_name("m3b6v8g24"), 768)  # 3 does not divide 32
    assert not can_tile(CodebookConfig.from_name("m1b12v8g64"), 1024)  # 12-bit codes are int16


@pytest.mark.parametrize("name,n,k", TILEABLE)
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_tiled_layer_computes_what_the_row_major_one_does(name, n, k, tokens):
    layer = _layer(name, n, k, bias=True)
    x = torch.randn(tokens, k, dtype=torch.float16)
    with torch.no_grad():
        expected = layer(x)
        weight = layer.dequantize()
        layer.tile_()
        assert layer.tiled and "tiled" in repr(layer)
        assert layer.codes.shape[2] == 32 and layer.scales.shape == (layer.config.num_groups(k), n)
        assert torch.equal(layer(x), expected)
        assert torch.equal(layer.dequantize(), weight)
    codes, _, scales = layer.unpacked()
    assert codes.shape == (n, k // layer.config.vec_len, layer.config.num_codebooks)
    assert scales.shape == (n, layer.config.num_groups(k))
    layer.untile_()
    assert not layer.tiled and layer.codes.is_contiguous() and layer.scales.is_contiguous()
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


def test_tile_is_a_no_op_where_the_config_does_not_tile():
    layer = _layer("m3b6v8g24", 9, 96)
    before = layer.codes
    assert not layer.tile_().tiled and layer.codes is before


def test_state_dict_is_row_major_and_loads_into_a_tiled_layer():
    layer = _layer("m2v8g128", 40, 256, bias=True)
    expected = {key: t.clone() for key, t in layer.state_dict().items()}
    layer.tile_()
    saved = layer.state_dict()
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor) and saved[key].is_contiguous(), key
    other = _layer("m2v8g128", 40, 256, bias=True).tile_()
    other.load_state_dict(saved)
    assert other.tiled
    assert torch.equal(other.codes, layer.codes) and torch.equal(other.scales, layer.scales)


def test_gradients_reach_tiled_scales_and_codebooks():
    layer = _layer("m2v8g128", 16, 256, dtype=torch.float32).tile_()
    layer.scales.requires_grad_(True)
    layer.codebooks.requires_grad_(True)
    layer(torch.randn(3, 256)).square().sum().backward()
    assert layer.scales.grad is not None and layer.scales.grad.shape == layer.scales.shape
    assert layer.codebooks.grad is not None and layer.codebooks.grad.abs().sum() > 0


def test_dispatch_gives_row_major_kernels_a_row_major_copy():
    layer = _layer("m2v8g128", 24, 256)
    x = torch.randn(2, 256, dtype=torch.float16)
    expected = codebook_matmul(x, layer.codes, layer.codebooks, layer.scales, None, layer.config, Backend.REFERENCE)
    tiled_codes, tiled_scales = tile_codes(layer.codes), tile_scales(layer.scales.data)
    got = codebook_matmul(x, tiled_codes, layer.codebooks, tiled_scales, None, layer.config, Backend.REFERENCE,
                          tiled=True)
    assert torch.equal(got, expected)


def test_tiled_custom_ops_match_and_validate_shapes():
    pytest.importorskip("triton")
    from codegemm.ops import custom_ops
    from codegemm.ops.triton_dequant import interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on the CPU")
    layer = _layer("m2v8g128", 24, 256)
    x = torch.randn(3, 256, dtype=torch.float16)
    rows = (layer.codes, layer.codebooks, layer.scales.data)
    tiled = (tile_codes(layer.codes), layer.codebooks, tile_scales(layer.scales.data))
    for op in (custom_ops.psumbook_mm, custom_ops.dequant_mm, custom_ops.dequant_dense_mm):
        assert torch.equal(op(x, *tiled, None, True), op(x, *rows, None)), op
    with pytest.raises(ShapeError, match="tiled scales"):
        custom_ops.psumbook_mm(x, tiled[0], tiled[1], rows[2], None, True)
    with pytest.raises(ShapeError, match="tiled codes"):
        custom_ops.psumbook_mm(x, rows[0], tiled[1], tiled[2], None, True)


def test_tiled_siblings_without_a_grouped_kernel_run_alone():
    model = build_random_quantized_model(tiny_llama_config(), "m2v8g128", device="cpu", dtype=torch.float32, seed=0)
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        expected = model(ids).logits
        for _, layer in quantized_modules(model):
            layer.tile_()
        fuse_siblings(model, row_multiple=1)
        assert torch.equal(model(ids).logits, expected)
    x = torch.randn(1, 128)
    layers = [(m.codes, m.codebooks, m.scales) for m in (model.model.layers[0].self_attn.k_proj,)]
    assert grouped_matmul(x, layers, None, CodebookConfig.from_name("m2v8g128"), tiled=True) is None


def test_tile_for_gpu_leaves_cpu_models_row_major():
    model = nn.Sequential(_layer("m2v8g128", 24, 256))
    assert tile_for_gpu(model) == 0 and not model[0].tiled
    model[0].tile_()
    untile(model)
    assert not model[0].tiled


def test_save_pretrained_of_a_tiled_model_is_row_major(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from codegemm.hf import attach_quantization_config

    model = build_random_quantized_model(tiny_llama_config(), "m2v8g128", device="cpu", dtype=torch.float16, seed=0)
    expected = {key: t.clone() for key, t in model.state_dict().items()}
    ids = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        want = model(ids).logits
    for _, layer in quantized_modules(model):
        layer.tile_()
    attach_quantization_config(model)
    model.save_pretrained(str(tmp_path))
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert stored["model.layers.0.self_attn.q_proj.codes"].shape == (128, 16, 2)
    for key, tensor in expected.items():
        if key in stored:
            assert torch.equal(stored[key], tensor), key
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float16)
    assert not any(layer.tiled for _, layer in quantized_modules(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
