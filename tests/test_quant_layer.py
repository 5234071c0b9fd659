"""The layer quantizer: fit quality, determinism, the search's bookkeeping, RTN, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codegemm import CodebookConfig, CodeGEMMLinear, ConfigError, DTypeError, RangeError, ShapeError, reference
from codegemm.quant import make_options, quantize_linear, rtn_fake_quant, rtn_quantize
from codegemm.quant.aq import quantize_weight
from codegemm.quant.beam import beam_sweep
from codegemm.quant.kmeans import nearest, residual_kmeans


def _correlated_inputs(tokens: int, k: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    scale = torch.logspace(-1, 0.5, k)[torch.randperm(k, generator=gen)]
    return (torch.randn(tokens, k, generator=gen) @ mix) * scale


def _linear(n: int, k: int, bias: bool = False, seed: int = 2) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


def _out_error(layer: nn.Module, lin: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = x @ lin.weight.T
        got = layer(x) - (0 if lin.bias is None else lin.bias)
        return float((got - ref).pow(2).sum() / ref.pow(2).sum())


FAST = dict(max_rounds=2, adam_steps=10, kmeans_iters=6)


@pytest.mark.parametrize("name", ["m1b4v4g32", "m2b5v8g64", "m2b4v4", "m1b3v2g16"])
def test_quantize_linear_builds_a_matching_layer(name):
    lin = _linear(48, 128, bias=True)
    x = _correlated_inputs(256, 128)
    layer = quantize_linear(lin, name, inputs=x, **FAST)
    assert isinstance(layer, CodeGEMMLinear) and layer.config == CodebookConfig.from_name(name)
    codes, books, scales = layer.unpacked()
    weight = reference.dequantize(codes, books, scales, torch.float64)
    probe = torch.randn(5, 128, dtype=torch.float64)
    expected = probe @ weight.T + lin.bias.double()
    assert torch.allclose(layer(probe.float()).double(), expected, atol=1e-4, rtol=1e-4)
    assert 0 < layer.quant_result.rel_error < 0.5


def test_error_decreases_over_rounds():
    lin = _linear(64, 128)
    x = _correlated_inputs(512, 128)
    layer = quantize_linear(lin, "m2b6v8g64", inputs=x, max_rounds=4, tol=0.0, adam_steps=15, kmeans_iters=5)
    history = layer.quant_result.history
    assert len(history) >= 3
    assert history[-1] < 0.9 * history[0]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:]))


def test_inputs_switch_the_objective_to_output_error():
    lin = _linear(64, 128)
    x = _correlated_inputs(512, 128)
    with_x = quantize_linear(lin, "m1b4v4g32", inputs=x, **FAST)
    without = quantize_linear(lin, "m1b4v4g32", **FAST)
    assert _out_error(with_x, lin, x) < _out_error(without, lin, x)


def test_beats_rtn_at_equal_bits_on_output_error():
    lin = _linear(64, 256)
    x = _correlated_inputs(512, 256)
    aq = quantize_linear(lin, "m2b8v8g128", inputs=x, **FAST)  # 2 bits of codes per weight
    rtn = quantize_linear(lin, "m1b2v1g128", method="rtn")  # 2-bit RTN, same scales
    assert _out_error(aq, lin, x) < 0.7 * _out_error(rtn, lin, x)


def test_seeded_and_deterministic():
    lin = _linear(32, 64)
    x = _correlated_inputs(128, 64)
    a = quantize_linear(lin, "m2b4v4g32", inputs=x, seed=3, **FAST)
    b = quantize_linear(lin, "m2b4v4g32", inputs=x, seed=3, **FAST)
    c = quantize_linear(lin, "m2b4v4g32", inputs=x, seed=4, **FAST)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks) and torch.equal(a.scales, b.scales)
    assert not torch.equal(a.codebooks, c.codebooks)


def test_beam_sweep_keeps_error_and_gradient_exact_and_never_increases_loss():
    torch.manual_seed(5)
    n, k, v, m, size = 24, 64, 4, 2, 16
    w = torch.randn(n, k, dtype=torch.float64)
    x = _correlated_inputs(256, k).double()
    h = x.T @ x / x.shape[0]
    books = torch.randn(m, size, v, dtype=torch.float64)
    scales = torch.rand(n, 2, dtype=torch.float64) + 0.5
    codes = torch.randint(0, size, (n, k // v, m))
    error = w - reference.dequantize(codes, books, scales, torch.float64)
    grad = error @ h
    before = float((error * grad).sum())
    for beam in (1, 3):
        beam_sweep(codes, books, scales, error, grad, h, beam)
        fresh = w - reference.dequantize(codes, books, scales, torch.float64)
        assert torch.allclose(error, fresh, atol=1e-10)
        assert torch.allclose(grad, fresh @ h, atol=1e-9)
        after = float((error * grad).sum())
        assert after <= before + 1e-9
        before = after


def test_residual_kmeans_codes_in_range_and_fit_better_with_more_codebooks():
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(2000, 4, generator=gen)
    errs = []
    for m in (1, 2):
        books, codes = residual_kmeans(vectors, m, 16, 8, 1 << 16, torch.Generator().manual_seed(0))
        assert books.shape == (m, 16, 4) and codes.shape == (2000, m)
        assert int(codes.min()) >= 0 and int(codes.max()) < 16
        recon = sum(books[i][codes[:, i]] for i in range(m))
        errs.append(float((recon - vectors).pow(2).mean()))
    assert errs[1] < errs[0]
    centroids = torch.randn(7, 4)
    pts = torch.randn(50, 4)
    assert torch.equal(nearest(pts, centroids), torch.cdist(pts, centroids).argmin(-1))


def test_quantize_weight_without_hessian_uses_weight_error():
    w = torch.randn(16, 32)
    result = quantize_weight(w, CodebookConfig.from_name("m1b4v4g16"), None, make_options(**FAST),
                             torch.Generator().manual_seed(0))
    recon = reference.dequantize(result.codes, result.codebooks, result.scales)
    rel = float((recon - w).pow(2).sum() / w.pow(2).sum())
    assert rel == pytest.approx(result.rel_error, rel=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_codebook_form_matches_symmetric_fake_quant(bits):
    w = torch.randn(8, 64)
    config = CodebookConfig(num_codebooks=1, nbits=bits, vec_len=1, group_size=32)
    codes, books, scales = rtn_quantize(w, config)
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**bits
    dense = reference.dequantize(codes, books, scales)
    assert torch.allclose(dense, rtn_fake_quant(w, bits, 32, symmetric=True), atol=1e-6)
    asym = rtn_fake_quant(w, bits, 32)
    assert (asym - w).abs().max() <= (w.abs().amax() * 2 / (2**bits - 1)) + 1e-6


def test_rtn_needs_a_scalar_codebook_config():
    with pytest.raises(ConfigError, match="m1b<bits>v1"):
        quantize_linear(_linear(8, 32), "m2v8g32", method="rtn")


def test_bad_input_is_refused_before_work():
    lin = _linear(16, 64)
    with pytest.raises(ConfigError, match="multiple of group_size"):
        quantize_linear(lin, "m1b4v4g48")
    with pytest.raises(ConfigError, match="vec_len"):
        quantize_linear(_linear(16, 60), "m1b4v8")
    bad = _linear(16, 64)
    with torch.no_grad():
        bad.weight[3, 5] = float("nan")
        bad.weight[0, 0] = float("inf")
    with pytest.raises(RangeError, match="2 NaN/Inf"):
        quantize_linear(bad, "m1b4v4g32")
    with pytest.raises(ShapeError, match="in_features=64"):
        quantize_linear(lin, "m1b4v4g32", inputs=torch.randn(10, 32))
    with pytest.raises(RangeError, match="inputs must be finite"):
        quantize_linear(lin, "m1b4v4g32", inputs=torch.full((4, 64), float("nan")))
    with pytest.raises(DTypeError, match="nn.Linear"):
        quantize_linear(nn.Conv1d(4, 4, 1), "m1b4v4g32")
    with pytest.raises(ConfigError, match="unknown quantization options"):
        quantize_linear(lin, "m1b4v4g32", beam=3)
    with pytest.raises(ConfigError, match="beam_size"):
        quantize_linear(lin, "m1b4v4g32", beam_size=0)
