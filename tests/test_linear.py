"""CodeGEMMLinear against the reference: configs, batches, dtypes, odd sizes, bad input."""

import threading

import pytest
import torch
import torch.nn.functional as F

from codegemm import CodebookConfig, CodeGEMMLinear, ConfigError, DTypeError, RangeError, ShapeError, reference
from helpers import random_quantized, rel_error

CONFIGS = [
    "m1b2v2g4",
    "m1v4g128",
    "m1b5v16g32",
    "m2v8g128",
    "m2b4v4g32",
    "m2b6v8",
    "m2b3v2g6",
    "m3b8v4g12",
    "m3b7v16g48",
    "m4b2v8g16",
    "m4b8v2",
    "m2b8v16g16",
]
# (out_features, in_features) per config: odd N, K a multiple of lcm(v, g) that is not a power of two
SHAPES = [(37, 96), (53, 192)]


def _k_for(config: CodebookConfig, k: int) -> int:
    step = config.group_size or config.vec_len
    return max(step, (k // step) * step)


def _tolerance(x, weight, ref):
    """Twice the error of the same-precision PyTorch matmul of the dequantized weight."""
    if x.dtype == torch.float32:
        return 1e-5
    torch_path = F.linear(x.float(), weight.to(x.dtype).float()).to(x.dtype)
    return 2 * rel_error(torch_path, ref) + 1e-6


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 16, 53])
def test_forward_matches_reference(name, dtype, tokens):
    config = CodebookConfig.from_name(name)
    n, k = SHAPES[tokens % 2]
    k = _k_for(config, k)
    codes, codebooks, scales = random_quantized(config, n, k)
    bias = torch.randn(n) if tokens % 2 else None
    layer = CodeGEMMLinear.from_unpacked(codes, codebooks, scales, bias, config=config)
    assert layer.config == config
    x = torch.randn(tokens, k).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (tokens, n)
    ref = reference.psumbook_matmul(x, codes, codebooks, scales, bias)
    weight = reference.dequantize(codes, codebooks, scales, torch.float64)
    assert rel_error(out, ref) <= _tolerance(x, weight, ref - (0 if bias is None else bias.double()))


@pytest.mark.parametrize("name", ["m2v8g128", "m3b5v4g8", "m1b4v2"])
@pytest.mark.parametrize("tokens", [128, 8])
def test_identity_input_returns_dequantized_weight_exactly(name, tokens):
    """x = I isolates layout bugs: rows of the output are columns of W, bit for bit in fp32."""
    config = CodebookConfig.from_name(name)
    k = max(tokens, config.group_size or 0)
    codes, codebooks, scales = random_quantized(config, 29, k)
    layer = CodeGEMMLinear.from_unpacked(codes, codebooks, scales)
    weight = layer.dequantize(torch.float32)
    for start in range(0, k, tokens):
        eye = torch.eye(k)[start : start + tokens]
        assert torch.equal(layer(eye).T, weight[:, start : start + tokens])


def test_leading_dims_and_fresh_outputs():
    config = CodebookConfig.from_name("m2v8g128")
    layer = CodeGEMMLinear.from_unpacked(*random_quantized(config, 48, 256))
    x = torch.randn(2, 3, 256)
    first, second = layer(x), layer(x)
    assert first.shape == (2, 3, 48)
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, second)


def test_unpacked_round_trip_and_storage_dtype():
    config = CodebookConfig.from_name("m2b6v4g32")
    codes, codebooks, scales = random_quantized(config, 16, 64)
    layer = CodeGEMMLinear.from_unpacked(codes.to(torch.int16), codebooks, scales)
    assert layer.codes.dtype == torch.uint8
    got_codes, got_books, got_scales = layer.unpacked()
    assert torch.equal(got_codes, codes) and torch.equal(got_books, codebooks) and torch.equal(got_scales, scales)
    assert torch.equal(layer.dequantize(), reference.dequantize(codes, codebooks, scales))


def test_wide_codes_for_imports():
    config = CodebookConfig.from_name("m1b12v8")
    codes, codebooks, scales = random_quantized(config, 8, 64)
    layer = CodeGEMMLinear.from_unpacked(codes, codebooks, scales)
    assert layer.codes.dtype == torch.int32
    x = torch.randn(2, 64)
    assert rel_error(layer(x), reference.psumbook_matmul(x, codes, codebooks, scales)) < 1e-5


def test_concurrent_calls_agree():
    """Nothing is shared between calls: threads get the same answers as a serial run."""
    config = CodebookConfig.from_name("m2v8g128")
    layer = CodeGEMMLinear.from_unpacked(*random_quantized(config, 64, 512))
    inputs = [torch.randn(t, 512) for t in (1, 2, 5, 1, 3, 7)]
    expected = [layer(x) for x in inputs]
    results: list[torch.Tensor | None] = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            results[i] = layer(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_gradients_flow_to_codebooks_scales_and_input():
    config = CodebookConfig.from_name("m2b4v4g16")
    codes, codebooks, scales = random_quantized(config, 12, 32)
    layer = CodeGEMMLinear.from_unpacked(codes, codebooks, scales)
    layer.codebooks.requires_grad_(True)
    layer.scales.requires_grad_(True)
    x = torch.randn(5, 32, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.codebooks.grad is not None and layer.scales.grad is not None and x.grad is not None
    with torch.no_grad():
        assert rel_error(layer(x), reference.dense_matmul(x, codes, codebooks, scales)) < 1e-5


# --- bad input ---------------------------------------------------------------------------------


def _layer():
    config = CodebookConfig.from_name("m2b4v4g16")
    return CodeGEMMLinear.from_unpacked(*random_quantized(config, 8, 32)), config


def test_wrong_last_dim_names_x():
    layer, _ = _layer()
    with pytest.raises(ShapeError, match="x must have last dimension in_features=32"):
        layer(torch.randn(2, 31))


def test_integer_activations_rejected():
    layer, _ = _layer()
    with pytest.raises(DTypeError, match="x must be"):
        layer(torch.ones(2, 32, dtype=torch.int64))


def test_float_codes_rejected():
    config = CodebookConfig.from_name("m2b4v4g16")
    codes, codebooks, scales = random_quantized(config, 8, 32)
    with pytest.raises(DTypeError, match="codes must have an integer dtype"):
        CodeGEMMLinear.from_unpacked(codes.float(), codebooks, scales)


def test_out_of_range_codes_rejected():
    config = CodebookConfig.from_name("m2b4v4g16")
    codes, codebooks, scales = random_quantized(config, 8, 32)
    codes[3, 2, 1] = 16
    with pytest.raises(RangeError, match=r"codes must lie in \[0, 16\)"):
        CodeGEMMLinear.from_unpacked(codes, codebooks, scales)
    codes[3, 2, 1] = -1
    with pytest.raises(RangeError, match="codes"):
        CodeGEMMLinear.from_unpacked(codes, codebooks, scales)


def test_non_finite_codebooks_rejected():
    config = CodebookConfig.from_name("m2b4v4g16")
    codes, codebooks, scales = random_quantized(config, 8, 32)
    codebooks[0, 1, 2] = float("nan")
    with pytest.raises(RangeError, match="codebooks must be finite"):
        CodeGEMMLinear.from_unpacked(codes, codebooks, scales)


def test_v_not_dividing_k_rejected():
    with pytest.raises(ConfigError, match="in_features=30 must be a multiple of vec_len=4"):
        CodeGEMMLinear(30, 8, "m2b4v4g16")


def test_g_not_multiple_of_v_rejected():
    with pytest.raises(ConfigError, match="group_size must be a positive multiple of vec_len=8"):
        CodeGEMMLinear(64, 8, CodebookConfig(2, 8, 8, 12))


def test_scales_shape_mismatch_names_scales():
    config = CodebookConfig.from_name("m2b4v4g16")
    codes, codebooks, scales = random_quantized(config, 8, 32)
    with pytest.raises(ShapeError, match="scales must have shape"):
        CodeGEMMLinear.from_unpacked(codes, codebooks, scales[:4])
    with pytest.raises(ShapeError, match="scales must have shape"):
        CodeGEMMLinear.from_unpacked(codes, codebooks, torch.ones(8, 3))


def test_non_power_of_two_codebook_rejected():
    config = CodebookConfig.from_name("m2b4v4g16")
    codes, codebooks, scales = random_quantized(config, 8, 32)
    with pytest.raises(ConfigError, match="power of two"):
        CodeGEMMLinear.from_unpacked(codes, codebooks[:, :12], scales)


def test_config_mismatch_rejected():
    config = CodebookConfig.from_name("m2b4v4g16")
    codes, codebooks, scales = random_quantized(config, 8, 32)
    with pytest.raises(ConfigError, match="does not match"):
        CodeGEMMLinear.from_unpacked(codes, codebooks, scales, config="m2b4v4g8")
    layer = CodeGEMMLinear.from_unpacked(codes, codebooks, scales, config=config)
    assert layer.config == config
