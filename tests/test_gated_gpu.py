"""A gated MLP's gate and up layers with the activation fused into the split-K reduce, on the device (``-m gpu``).

The fused output must equal ``act(gate) * up`` of the float64 reference within the kernels' bar, match the
unfused grouped launch, be deterministic, cover every kernel family (one token, 2-4 tokens on the tiled
layout, 5-16 tokens, unsplit K), and change nothing in a compiled, graph-replayed decode of a real model.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_grouped_decode_matches_separate, rel_error, seeded_cuda_layer

from codegemm import CodebookConfig, reference
from codegemm.layout import tile_tables
from codegemm.ops import custom_ops
from codegemm.ops.cuda import GATE_ACTS
from codegemm.siblings import unfuse_siblings

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
ACTS = {"silu": torch.nn.functional.silu, "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}


def _gated_reference(x, layers, bias, act: str) -> torch.Tensor:
    out = torch.cat([reference.dense_matmul(x, *layer, None, torch.float64) for layer in layers], dim=1)
    if bias is not None:
        out = out + bias.double()
    gate, up = out.chunk(2, dim=1)
    return ACTS[act](gate) * up


def _lists(layers):
    return [list(t) for t in zip(*layers)]


@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128"])
@pytest.mark.parametrize("n,k", [(14336, 4096), (1024, 2048), (512, 512)])
@pytest.mark.parametrize("tokens", [1, 2, 4, 7, 16])
@pytest.mark.parametrize("tiled", [False, True])
def test_gated_matches_reference_and_unfused(name, n, k, tokens, tiled):
    config = CodebookConfig.from_name(name)
    rows = [seeded_cuda_layer(config, n, k, seed=tokens + s) for s in (0, 1)]
    layers = [tile_tables(*layer) for layer in rows] if tiled else rows
    x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float16)
    act = "silu" if tokens % 2 else "gelu_tanh"
    fused = custom_ops.gated_cuda_mm(x, *_lists(layers), None, tiled, act)
    ref = _gated_reference(x, rows, None, act)
    assert fused.shape == (tokens, n) and fused.dtype == torch.float16
    assert rel_error(fused, ref) <= 1e-3, f"{name} {n}x{k} tokens={tokens} tiled={tiled}"
    unfused = custom_ops.gate(custom_ops.grouped_cuda_mm(x, *_lists(layers), None, tiled), GATE_ACTS[act])
    # Same partial sums, same roundings; only the fp32 activation's last bit may differ.
    assert rel_error(fused, unfused.double()) <= 2e-3
    assert torch.equal(fused, custom_ops.gated_cuda_mm(x, *_lists(layers), None, tiled, act))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 12])
def test_gated_bias_and_bf16(dtype, tokens):
    config = CodebookConfig.from_name("m2v8g128")
    layers = [seeded_cuda_layer(config, 2048, 4096, seed=11 + s) for s in (0, 1)]
    x = torch.randn(tokens, 4096, device=DEVICE, dtype=dtype)
    bias = torch.randn(4096, device=DEVICE, dtype=dtype)
    fused = custom_ops.gated_cuda_mm(x, *_lists(layers), bias, False, "silu")
    ref = _gated_reference(x, layers, bias, "silu")
    unfused = custom_ops.gate(custom_ops.grouped_cuda_mm(x, *_lists(layers), bias), GATE_ACTS["silu"])
    bound = 1e-3 if dtype == torch.float16 else 2 * rel_error(unfused, ref)
    assert fused.dtype == dtype and rel_error(fused, ref) <= max(bound, 1e-3)


def test_gated_rejects_bad_groups():
    config = CodebookConfig.from_name("m2v8g128")
    x = torch.randn(1, 1024, device=DEVICE, dtype=torch.float16)
    a, b = seeded_cuda_layer(config, 1024, 1024), seeded_cuda_layer(config, 512, 1024)
    with pytest.raises(ValueError, match="equal out_features"):
        custom_ops.gated_cuda_mm(x, *_lists([a, b]), None, False, "silu")
    with pytest.raises(ValueError, match="act must be one of"):
        custom_ops.gated_cuda_mm(x, *_lists([a, a]), None, False, "relu")


def test_compiled_graph_decode_with_fused_mlp_equals_unfused():
    model = assert_grouped_decode_matches_separate(seed=3)
    assert any(getattr(m, "_codegemm_gated", False) for m in model.modules())
    unfuse_siblings(model)
    assert not any(getattr(m, "_codegemm_gated", False) or "forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("tokens", [17, 40, 64])
@pytest.mark.parametrize("tiled", [False, True])
def test_gated_through_the_dispatcher_above_16_tokens(tokens, tiled):
    """17-64 tokens: the fused MLP runs as slices of at most 16 tokens (``cuda_grouped_sliced``)."""
    from codegemm.ops.dispatch import gated_matmul, select_grouped_kernel

    config = CodebookConfig.from_name("m2v8g128")
    assert select_grouped_kernel(DEVICE, config, tokens, torch.float16).name == "cuda_grouped_sliced"
    rows = [seeded_cuda_layer(config, 2048, 1024, seed=tokens + s) for s in (0, 1)]
    layers = [tile_tables(*layer) for layer in rows] if tiled else rows
    x = torch.randn(tokens, 1024, device=DEVICE, dtype=torch.float16)
    fused = gated_matmul(x, layers, None, config, "silu", tiled=tiled)
    assert fused is not None and fused.shape == (tokens, 2048)
    assert rel_error(fused, _gated_reference(x, rows, None, "silu")) <= 1e-3
    assert torch.equal(fused, gated_matmul(x, layers, None, config, "silu", tiled=tiled))

