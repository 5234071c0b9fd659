"""GPU kernels on the device (``-m gpu``): benchmark shapes vs float64, determinism, compile + CUDA graphs, bad input.

The small-shape config sweep of tests/test_triton_kernels.py also runs on the
GPU when CUDA is present; this file adds what needs real sizes and a device.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CUDA_SWEEP_CONFIGS, CUDA_SWEEP_SHAPES, assert_compiled_graph_matches_eager, rel_error, sweep_config
from torch import nn

from codegemm import CodebookConfig, CodeGEMMError, CodeGEMMLinear, DTypeError, ShapeError, reference
from codegemm.ops.dispatch import Backend, codebook_matmul, select_kernel
from codegemm.shapes import DECODER_BLOCKS

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
BENCH_SHAPES = sorted({(s.in_features, s.out_features) for m in ("llama3-8b", "llama3-70b") for s in DECODER_BLOCKS[m]})


def _random_layer(config: CodebookConfig, n: int, k: int):
    codes = torch.randint(0, config.codebook_size, (n, k // config.vec_len, config.num_codebooks), device=DEVICE,
                          dtype=torch.int32).to(config.code_dtype)
    codebooks = torch.randn(config.num_codebooks, config.codebook_size, config.vec_len, device=DEVICE).half()
    scales = (0.5 + torch.rand(n, config.num_groups(k), device=DEVICE)).mul_(0.02).half()
    return codes, codebooks, scales


@pytest.mark.parametrize("k,n", BENCH_SHAPES)
@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128"])
def test_benchmark_shapes_fp16_within_1e3(k, n, name):
    config = CodebookConfig.from_name(name)
    codes, codebooks, scales = _random_layer(config, n, k)
    for tokens in (1, 4, 16, 33):
        x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float16)
        out = codebook_matmul(x, codes, codebooks, scales, None, config)
        ref = reference.dense_matmul(x, codes, codebooks, scales, None, torch.float64)
        err = rel_error(out, ref)
        assert err <= 1e-3, f"{name} {k}x{n} tokens={tokens}: relative error {err:.2e}"


@pytest.mark.parametrize("k,n", [(4096, 4096), (14336, 4096), (8192, 10240)])
def test_benchmark_shapes_bf16_within_2x_torch(k, n):
    config = CodebookConfig.from_name("m2v8g128")
    codes, codebooks, scales = _random_layer(config, n, k)
    weight = reference.dequantize(codes, codebooks, scales, torch.float64)
    for tokens in (1, 8, 16, 40):
        x = torch.randn(tokens, k, device=DEVICE, dtype=torch.bfloat16)
        ref = x.double() @ weight.T
        torch_err = rel_error(F.linear(x, weight.to(torch.bfloat16)), ref)
        err = rel_error(codebook_matmul(x, codes, codebooks, scales, None, config), ref)
        assert err <= 2 * torch_err, f"tokens={tokens}: {err:.2e} > 2 x {torch_err:.2e}"


@pytest.mark.parametrize("tokens", [1, 5, 16, 64])
def test_deterministic_bit_identical(tokens):
    config = CodebookConfig.from_name("m2v8g128")
    codes, codebooks, scales = _random_layer(config, 4096, 14336)
    x = torch.randn(tokens, 14336, device=DEVICE, dtype=torch.float16)
    bias = torch.randn(4096, device=DEVICE, dtype=torch.float16)
    first = codebook_matmul(x, codes, codebooks, scales, bias, config)
    for _ in range(5):
        assert torch.equal(first, codebook_matmul(x, codes, codebooks, scales, bias, config))


def test_output_fully_written():
    """Poisoned caching-allocator memory must never show through: no NaN/Inf anywhere in the output."""
    config = CodebookConfig.from_name("m2v8g128")
    codes, codebooks, scales = _random_layer(config, 6144, 4096)
    for tokens in (1, 3, 16, 17):
        poison = torch.full((tokens, 6144), float("nan"), device=DEVICE, dtype=torch.float16)
        del poison
        out = codebook_matmul(torch.randn(tokens, 4096, device=DEVICE, dtype=torch.float16), codes, codebooks,
                              scales, None, config)
        assert torch.isfinite(out).all()


def test_dispatch_picks_gpu_kernels_on_cuda():
    config = CodebookConfig.from_name("m2v8g128")
    assert select_kernel(DEVICE, config, 1, torch.float16).name == "cuda_psumbook"
    assert select_kernel(DEVICE, config, 2, torch.float16).name == "cuda_codebook_mma"
    assert select_kernel(DEVICE, config, 16, torch.bfloat16).name == "cuda_codebook_mma"
    assert select_kernel(DEVICE, CodebookConfig.from_name("m1v4g128"), 1, torch.float16).name == "cuda_psumbook"
    assert select_kernel(DEVICE, CodebookConfig.from_name("m1v4g128"), 2, torch.float16).name == "cuda_codebook_mma"
    assert select_kernel(DEVICE, CodebookConfig.from_name("m2v4g128"), 16, torch.float16).name == "triton_psumbook"
    assert select_kernel(DEVICE, config, 17, torch.float16).name == "cuda_sliced"
    assert select_kernel(DEVICE, config, 64, torch.bfloat16).name == "cuda_sliced"
    assert select_kernel(DEVICE, config, 65, torch.float16).name == "dequant_dense"
    assert select_kernel(DEVICE, CodebookConfig.from_name("m2v4g128"), 17, torch.float16).name == "dequant_dense"
    assert select_kernel(DEVICE, config, 17, torch.float16, Backend.TRITON).name == "triton_dequant_gemm"


@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096), (8192, 10240)])
@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128", "m3b6v8g64", "m2v8"])
def test_prefill_dense_path_auto(k, n, name):
    """AUTO above the sliced range (any count above 16 for configs without CUDA kernels): dequantization to a dense
    weight + cuBLAS; float64 reference, reruns equal."""
    config = CodebookConfig.from_name(name)
    codes, codebooks, scales = _random_layer(config, n, k)
    bias = torch.randn(n, device=DEVICE, dtype=torch.float16)
    sliced = select_kernel(DEVICE, config, 17, torch.float16).name == "cuda_sliced"
    assert sliced == (name in ("m2v8g128", "m1v4g128", "m2v8"))
    for tokens in (65, 128) if sliced else (17, 64, 128):
        assert select_kernel(DEVICE, config, tokens, torch.float16).name == "dequant_dense"
        x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float16)
        out = codebook_matmul(x, codes, codebooks, scales, bias, config)
        ref = reference.dense_matmul(x, codes, codebooks, scales, bias, torch.float64)
        err = rel_error(out, ref)
        assert err <= 1e-3, f"{name} {k}x{n} tokens={tokens}: relative error {err:.2e}"
        for _ in range(3):
            assert torch.equal(out, codebook_matmul(x, codes, codebooks, scales, bias, config))


@pytest.mark.parametrize("tokens", [17, 64, 128])
def test_prefill_dense_path_bf16_and_fused_agree(tokens):
    """bf16 within 2x a bf16 PyTorch matmul; the fused GEMM (backend='triton') stays reachable and correct."""
    config = CodebookConfig.from_name("m2v8g128")
    codes, codebooks, scales = _random_layer(config, 4096, 4096)
    weight = reference.dequantize(codes, codebooks, scales, torch.float64)
    from codegemm.ops.triton_dequant_dense import dequantize_triton

    dense = dequantize_triton(codes, codebooks, scales, torch.float16)
    assert torch.equal(dense, reference.dequantize(codes, codebooks, scales, torch.float32).half())
    x = torch.randn(tokens, 4096, device=DEVICE, dtype=torch.bfloat16)
    ref = x.double() @ weight.T
    torch_err = rel_error(F.linear(x, weight.to(torch.bfloat16)), ref)
    assert rel_error(codebook_matmul(x, codes, codebooks, scales, None, config), ref) <= 2 * torch_err
    fused = codebook_matmul(x, codes, codebooks, scales, None, config, Backend.TRITON)
    assert rel_error(fused, ref) <= 2 * torch_err


@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128", "m2v8", "m1v4g256"])
def test_cuda_dequantize_equals_reference_rounded_once(name):
    """The prefill path's CUDA dequantization equals reference.dequantize in fp32, rounded once to the dtype."""
    from codegemm.ops.cuda import cuda_dequant_eligible, dequantize_cuda

    config = CodebookConfig.from_name(name)
    for n, k in [(1000, 1024), (4099, 2048), (16, 256)]:
        codes, codebooks, scales = _random_layer(config, n, k)
        expected = reference.dequantize(codes, codebooks, scales, torch.float32)
        for dtype in (torch.float16, torch.bfloat16):
            assert cuda_dequant_eligible(codes, codebooks, scales, dtype)
            assert torch.equal(dequantize_cuda(codes, codebooks, scales, dtype), expected.to(dtype)), (n, k, dtype)


@pytest.mark.parametrize("backend", [Backend.CUDA, Backend.TRITON])
@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128", "m2v8"])
def test_psumbook_backends_all_token_counts(backend, name):
    """Both Psumbook implementations, every token count 1-16, both dtypes, bias, odd N."""
    config = CodebookConfig.from_name(name)
    n, k = 1000, 1024
    codes, codebooks, scales = _random_layer(config, n, k)
    for tokens in range(1, 17):
        dtype = torch.float16 if tokens % 2 else torch.bfloat16
        x = torch.randn(tokens, k, device=DEVICE, dtype=dtype)
        bias = torch.randn(n, device=DEVICE, dtype=dtype) if tokens % 3 else None
        out = codebook_matmul(x, codes, codebooks, scales, bias, config, backend)
        ref = reference.dense_matmul(x, codes, codebooks, scales, bias, torch.float64)
        weight = reference.dequantize(codes, codebooks, scales, torch.float64).to(dtype)
        torch_err = rel_error(F.linear(x, weight, bias), ref)
        err = rel_error(out, ref)
        assert err <= max(1e-3 if dtype == torch.float16 else 0, 2 * torch_err), f"tokens={tokens}: {err:.2e}"


def test_cuda_kernel_split_and_row_plans_agree():
    from codegemm.ops.cuda import psumbook_matmul_cuda

    config = CodebookConfig.from_name("m2v8g128")
    codes, codebooks, scales = _random_layer(config, 3000, 2048)
    x = torch.randn(5, 2048, device=DEVICE, dtype=torch.float16)
    ref = reference.dense_matmul(x, codes, codebooks, scales, None, torch.float64)
    for rpt in (2, 4):
        for splits in (1, 3, 16):
            out = psumbook_matmul_cuda(x, codes, codebooks, scales, None, rpt, splits)
            assert rel_error(out, ref) <= 1e-3, (rpt, splits)


@pytest.mark.parametrize("name", CUDA_SWEEP_CONFIGS)
@pytest.mark.parametrize("n,k", CUDA_SWEEP_SHAPES)
def test_cuda_kernels_every_token_count_and_plan(name, n, k):
    """Both CUDA kernels called directly: tokens 1-16, fp16/bf16, bias, odd N, every tile/split plan."""
    from codegemm.ops.cuda import codebook_mma_cuda, codebook_mma_eligible, psumbook_matmul_cuda

    config = sweep_config(name, k)
    codes, codebooks, scales = _random_layer(config, n, k)
    for tokens in range(1, 17):
        dtype = torch.float16 if tokens % 2 else torch.bfloat16
        x = torch.randn(tokens, k, device=DEVICE, dtype=dtype)
        bias = torch.randn(n, device=DEVICE, dtype=dtype) if tokens % 3 else None
        ref = reference.dense_matmul(x, codes, codebooks, scales, bias, torch.float64)
        weight = reference.dequantize(codes, codebooks, scales, torch.float64).to(dtype)
        bound = max(1e-3 if dtype == torch.float16 else 0, 2 * rel_error(F.linear(x, weight, bias), ref))
        assert codebook_mma_eligible(x, codes, codebooks, scales, bias)
        for tiles, splits in [(None, None), (1, 1), (2, 3), (4, 5)]:
            out = codebook_mma_cuda(x, codes, codebooks, scales, bias, tiles, splits)
            assert rel_error(out, ref) <= bound, (tokens, tiles, splits)
        assert rel_error(psumbook_matmul_cuda(x, codes, codebooks, scales, bias), ref) <= bound, tokens


@pytest.mark.parametrize("tokens", [9, 16])
def test_codebook_mma_large_activation_budget_above_eight_tokens(tokens):
    """Above 8 tokens one block has the SM, so a split stages many more chunks of x than the two-block budget
    (fewer fp32 partials). K here needs two such splits plus one chunk: every plan still matches the reference."""
    from codegemm.ops import cuda

    budget = cuda.mma_x_budget(tokens, DEVICE)
    assert budget > cuda.MMA_MAX_X_CHUNKS
    per_split_max = budget // cuda.mma_x_rows(tokens)
    n, k = 1000, cuda.MMA_CHUNK_INPUTS * (2 * per_split_max + 1)
    config = CodebookConfig.from_name("m2v8g128")
    codes, codebooks, scales = _random_layer(config, n, k)
    x = torch.randn(tokens, k, device=DEVICE, dtype=torch.float16)
    ref = reference.dense_matmul(x, codes, codebooks, scales, None, torch.float64)
    _, planned = cuda.plan_mma(tokens, n, k, DEVICE)
    assert -(-(k // cuda.MMA_CHUNK_INPUTS) // planned) <= per_split_max
    for splits in (None, 1, 3):  # 1: raised to the fewest splits that fit
        out = cuda.codebook_mma_cuda(x, codes, codebooks, scales, None, None, splits)
        assert rel_error(out, ref) <= 1e-3, splits


def test_codebook_mma_falls_back_when_groups_are_small():
    """g = 64 splits a 128-input chunk: the op routes to the Psumbook kernel and stays correct."""
    from codegemm.ops.cuda import codebook_mma_eligible
    from codegemm.ops.custom_ops import codebook_mma_mm

    config = CodebookConfig.from_name("m2v8g64")
    codes, codebooks, scales = _random_layer(config, 512, 1024)
    x = torch.randn(4, 1024, device=DEVICE, dtype=torch.float16)
    assert not codebook_mma_eligible(x, codes, codebooks, scales, None)
    ref = reference.dense_matmul(x, codes, codebooks, scales, None, torch.float64)
    assert rel_error(codebook_mma_mm(x, codes, codebooks, scales, None), ref) <= 1e-3


class _TinyModel(nn.Module):
    def __init__(self, config: CodebookConfig, dim: int = 512, hidden: int = 1536) -> None:
        super().__init__()
        up = _random_layer(config, hidden, dim)
        down = _random_layer(config, dim, hidden)
        self.up = CodeGEMMLinear.from_unpacked(*up, bias=torch.randn(hidden, device=DEVICE).half())
        self.down = CodeGEMMLinear.from_unpacked(*down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x))) + x


@pytest.mark.parametrize("tokens", [1, 16, 24])
def test_compile_fullgraph_and_cuda_graph(tokens):
    model = _TinyModel(CodebookConfig.from_name("m2v8g128")).eval()
    x = torch.randn(2, (tokens + 1) // 2, 512, device=DEVICE, dtype=torch.float16)
    assert_compiled_graph_matches_eager(model, x)


def test_bad_input_is_an_error_or_correct():
    config = CodebookConfig.from_name("m2v8g128")
    codes, codebooks, scales = _random_layer(config, 256, 512)
    x = torch.randn(3, 512, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ShapeError):
        codebook_matmul(x[:, :384], codes, codebooks, scales, None, config, Backend.TRITON)
    with pytest.raises(DTypeError):
        codebook_matmul(x, codes.cpu(), codebooks, scales, None, config, Backend.TRITON)
    with pytest.raises(CodeGEMMError):
        codebook_matmul(x.to(torch.int32), codes, codebooks, scales, None, config, Backend.TRITON)
    wide = torch.randn(3, 1024, device=DEVICE, dtype=torch.float16)[:, 1::2]
    ref = reference.dense_matmul(wide, codes, codebooks, scales, None, torch.float64)
    assert rel_error(codebook_matmul(wide, codes, codebooks, scales, None, config), ref) <= 1e-3
    # Out-of-range codes (a corrupted tensor that skipped validation) give garbage, never a fault.
    small = CodebookConfig.from_name("m2b4v8g128")
    bad = torch.randint(0, 256, (256, 64, 2), device=DEVICE, dtype=torch.uint8)
    books = torch.randn(2, 16, 8, device=DEVICE).half()
    for tokens in (1, 20):
        codebook_matmul(torch.randn(tokens, 512, device=DEVICE).half(), bad, books, scales, None, small)
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128"])
@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
def test_graph_of_layers_with_early_weight_loads_equals_eager(name, tokens, monkeypatch):
    """Captured back to back, each matmul starts while the previous layer's kernels drain and loads its weights
    before waiting for them (``weights_settled``, codegemm/ops/cuda/settled.py); eager calls wait first. Both
    must give the same bits."""
    from codegemm.ops.cuda import settled

    config = CodebookConfig.from_name(name)
    layers = [CodeGEMMLinear.from_unpacked(*_random_layer(config, 1024, 1024)).tile_() for _ in range(4)]
    flags: list[bool] = []
    real = settled.tables_settled
    monkeypatch.setattr("codegemm.ops.cuda.tables_settled", lambda tables: flags.append(real(tables)) or flags[-1])

    def chain(x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = layer(x) * 0.05
        return x

    x = torch.randn(tokens, 1024, device=DEVICE, dtype=torch.float16)
    with torch.no_grad():
        eager = chain(x)
        assert flags and not any(flags)
        flags.clear()
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = chain(static_x)
        assert flags and all(flags)
        fresh = torch.randn_like(x)
        static_x.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(static_out, chain(fresh), rtol=0, atol=0)
        static_x.copy_(x)
        graph.replay()
        torch.testing.assert_close(static_out, eager, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128"])
@pytest.mark.parametrize("tiled", [False, True])
def test_sliced_path_17_to_64_tokens(name, tiled):
    """17-64 tokens run as slices of at most 16 through the 1-16-token kernels (no dense weight): float64 reference
    at every remainder kind (one token, 2-4, 5-16), fp16 and bf16 with bias, bit-identical reruns."""
    from codegemm.layout import tile_tables
    from codegemm.ops.triton_kernels import SLICED_MAX_TOKENS

    config = CodebookConfig.from_name(name)
    n, k = 3000, 2048
    codes, codebooks, scales = _random_layer(config, n, k)
    tables = tile_tables(codes, codebooks, scales) if tiled else (codes, codebooks, scales)
    for tokens in (17, 19, 24, 33, 47, SLICED_MAX_TOKENS):
        dtype = torch.float16 if tokens % 2 else torch.bfloat16
        assert select_kernel(DEVICE, config, tokens, dtype).name == "cuda_sliced"
        x = torch.randn(tokens, k, device=DEVICE, dtype=dtype)
        bias = torch.randn(n, device=DEVICE, dtype=dtype)
        ref = reference.dense_matmul(x, codes, codebooks, scales, bias, torch.float64)
        weight = reference.dequantize(codes, codebooks, scales, torch.float64).to(dtype)
        bound = max(1e-3 if dtype == torch.float16 else 0, 2 * rel_error(F.linear(x, weight, bias), ref))
        out = codebook_matmul(x, *tables, bias, config, tiled=tiled)
        assert out.shape == (tokens, n) and out.dtype == dtype
        assert rel_error(out, ref) <= bound, (tokens, dtype)
        assert torch.equal(out, codebook_matmul(x, *tables, bias, config, tiled=tiled)), tokens


def test_sliced_path_compiles_and_replays():
    """A layer at 40 tokens (three slices) under torch.compile(fullgraph=True) and in a captured CUDA graph."""
    config = CodebookConfig.from_name("m2v8g128")
    layer = CodeGEMMLinear.from_unpacked(*_random_layer(config, 1000, 2048),
                                         bias=torch.randn(1000, device=DEVICE).half()).tile_()
    x = torch.randn(40, 2048, device=DEVICE, dtype=torch.float16)
    assert_compiled_graph_matches_eager(layer, x)



def test_sliced_range_rebuilds_layers_the_cuda_kernels_do_not_take(monkeypatch):
    """bf16 codebooks: the CUDA kernels do not take the layer, so 17-64 tokens rebuild the weight once per call (as
    above 64) rather than slice into Triton Psumbook calls, which compile per shape (a 9.7 s first token in
    `codegemm generate` on a bf16 checkpoint before this fallback)."""
    from codegemm.ops import custom_ops

    rebuilt = []
    real = custom_ops.dequant_dense_matmul
    monkeypatch.setattr(custom_ops, "dequant_dense_matmul", lambda *args: rebuilt.append(1) or real(*args))
    config = CodebookConfig.from_name("m2v8g128")
    codes, codebooks, scales = _random_layer(config, 1000, 1024)
    codebooks = codebooks.bfloat16()
    x = torch.randn(24, 1024, device=DEVICE, dtype=torch.bfloat16)
    assert select_kernel(DEVICE, config, 24, torch.bfloat16).name == "cuda_sliced"
    ref = reference.dense_matmul(x, codes, codebooks, scales, None, torch.float64)
    weight = reference.dequantize(codes, codebooks, scales, torch.float64).to(torch.bfloat16)
    out = codebook_matmul(x, codes, codebooks, scales, None, config)
    assert rebuilt and rel_error(out, ref) <= 2 * rel_error(F.linear(x, weight), ref)
