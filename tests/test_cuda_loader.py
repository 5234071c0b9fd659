"""The CUDA Psumbook library's build-at-first-use logic and plan, checked without a GPU."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from codegemm.ops import cuda
from codegemm.ops.triton_psumbook import sm_count


def test_library_path_names_source_hash_and_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEGEMM_CUDA_CACHE", str(tmp_path))
    path = cuda.library_path("sm_90")
    assert path.parent == tmp_path
    assert path.name.startswith("psumbook_") and path.name.endswith("_sm_90.so")
    assert cuda.library_path("sm_80") != path


def test_diagnostic_builds_are_cached_apart(tmp_path, monkeypatch):
    """A -DCODEGEMM_TRACE library (scripts/trace_chain.py) must never be loaded as the plain one, or back."""
    monkeypatch.setenv("CODEGEMM_CUDA_CACHE", str(tmp_path))
    traced = cuda.library_path("sm_90", ("CODEGEMM_TRACE",))
    assert traced != cuda.library_path("sm_90")
    assert traced.name == cuda.library_path("sm_90").name.replace(".so", "_codegemm_trace.so")


def test_build_without_nvcc_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEGEMM_CUDA_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda, "_nvcc", lambda: None)
    with pytest.raises(RuntimeError, match="nvcc not found"):
        cuda.build("sm_90")


def test_load_library_falls_back_quietly(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEGEMM_CUDA_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda, "_nvcc", lambda: None)
    cuda.load_library.cache_clear()
    try:
        assert cuda.load_library("sm_75") is None
        monkeypatch.setenv("CODEGEMM_DISABLE_CUDA", "1")
        cuda.load_library.cache_clear()
        assert cuda.load_library("sm_90") is None
    finally:
        cuda.load_library.cache_clear()


def test_cpu_tensors_are_never_eligible():
    codes = torch.randint(0, 256, (64, 32, 2), dtype=torch.uint8)
    books = torch.randn(2, 256, 8).half()
    scales = torch.rand(64, 2).half()
    x = torch.randn(1, 256).half()
    assert not cuda.cuda_psumbook_eligible(x, codes, books, scales, None)
    assert not cuda.codebook_mma_eligible(x, codes, books, scales, None)
    assert not cuda.cuda_dequant_eligible(codes, books, scales, torch.float16)


def test_segment_strides_address_both_layouts():
    """The strides and swizzle the kernels get put code byte (row n, chunk c, byte b) and scale (row n, group j)
    where each layout stores them."""
    from codegemm.layout import tile_codes, tile_scales

    codes = torch.randint(0, 256, (48, 64, 2), dtype=torch.uint8)  # 4 chunks of 32 bytes per row
    books = torch.randn(2, 256, 8).half()
    scales = torch.rand(48, 4).half()
    tiled = (tile_codes(codes), books, tile_scales(scales))
    for layer, is_tiled in (((codes, books, scales), False), (tiled, True)):
        assert cuda.layer_geometry(*layer, is_tiled) == (48, 64, 2, 4)
        segs = cuda._segments([layer, layer], is_tiled)
        assert segs.count == 2 and segs.start[1] == 48 and segs.code_xor == (15 if is_tiled else 0)
        flat_codes, flat_scales = layer[0].reshape(-1), layer[2].reshape(-1)
        for n, c, b in [(0, 0, 0), (5, 3, 31), (47, 2, 7)]:
            offset = n * segs.code_row[0] + c * segs.code_chunk[0] + (b ^ (n & segs.code_xor))
            assert flat_codes[offset] == codes.reshape(48, 4, 32)[n, c, b]
        for n, j in [(0, 0), (7, 3), (47, 1)]:
            assert flat_scales[n * segs.scale_row[0] + j * segs.scale_group[0]] == scales[n, j]


@pytest.mark.parametrize("tokens", [1, 2, 7, 16])
def test_mma_plan_keeps_activations_on_chip(tokens):
    """Every split's activations fit the shared-memory budget, and no split is empty."""
    for n, k in [(4096, 4096), (57344, 8192), (512, 128), (4096, 14336)]:
        tiles, splits = cuda.plan_mma(tokens, n, k, torch.device("cpu"))
        chunks = k // cuda.MMA_CHUNK_INPUTS
        assert tiles in (1, 2, 4) and 1 <= splits <= chunks
        assert -(-chunks // splits) * cuda.mma_x_rows(tokens) <= cuda.mma_x_budget(tokens, torch.device("cpu"))


def test_mma_activation_rows_and_budget_off_gpu():
    """Above 8 tokens x is staged as 16 rows; off a GPU the budget is the two-block one."""
    assert [cuda.mma_x_rows(t) for t in (1, 8, 9, 16)] == [1, 8, 16, 16]
    assert cuda.mma_x_budget(16, torch.device("cpu")) == cuda.MMA_MAX_X_CHUNKS


def test_mma_block_rows_above_eight_tokens_ignore_the_tiles():
    """Above 8 tokens a block is 256 rows whether it is 16 warps of one m-tile or 8 of two (the default there), so
    sibling layers group on the same boundaries; up to 8 tokens the tiles multiply the rows."""
    assert [cuda.mma_block_rows(16, t) for t in (1, 2, 4)] == [256, 256, 256]
    assert [cuda.mma_block_rows(8, t) for t in (1, 2, 4)] == [256, 512, 1024]
    assert cuda.plan_mma(16, 4096, 4096, torch.device("cpu"))[0] == 2
    assert cuda.plan_mma(8, 4096, 4096, torch.device("cpu"))[0] == 1
    assert cuda.mma_rows_per_block(16, 4096, 4096, torch.device("cpu")) == 256


@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_plan_fills_the_gpu_within_the_chunks(tokens):
    for n, k in [(4096, 4096), (57344, 8192), (512, 128), (8192, 28672)]:
        rpt, splits = cuda.plan_cuda(tokens, n, k // 8, 2, torch.device("cpu"))
        assert rpt in (2, 4, 8)
        assert 1 <= splits <= k // 8 // 16
        if tokens == 1:  # up to eight chunks per block in one wave of two blocks per SM, else at most four
            chunks = k // 8 // 16
            per_split = -(-chunks // splits)
            assert 1 <= per_split <= 8
            blocks = -(-n // cuda.psumbook_rows_per_block(1, rpt)) * splits
            one_wave = blocks <= 2 * sm_count(torch.device("cpu"))
            assert per_split == 4 or one_wave or per_split == 1
            assert per_split <= 4 or one_wave


def test_one_token_plan_of_the_benchmark_layers():
    """The one-token splits swept on an H200 (docs/KERNELS.md, v12 and v20): Llama-3-70B down takes seven chunks per
    block in one wave, gate_up four in several waves."""
    with mock.patch("codegemm.ops.triton_psumbook.sm_count", return_value=132):
        assert cuda.plan_cuda(1, 8192, 28672 // 8, 2, torch.device("cpu")) == (4, 32)
        assert cuda.plan_cuda(1, 57344, 8192 // 8, 2, torch.device("cpu")) == (4, 16)
        assert cuda.plan_cuda(1, 4096, 4096 // 8, 2, torch.device("cpu")) == (2, 32)


def test_psumbook_mma_plan_stages_at_most_its_chunk_limit():
    for n, k in [(4096, 4096), (57344, 8192), (512, 128), (4096, 14336), (6144, 4096), (1000, 384)]:
        tiles, splits = cuda.plan_psumbook_mma(n, k, torch.device("cpu"))
        chunks = k // cuda.MMA_CHUNK_INPUTS
        assert tiles in (1, 2, 4) and 1 <= splits <= chunks
        assert 1 <= -(-chunks // splits) <= cuda.PSUMBOOK_MMA_MAX_CHUNKS


def test_psumbook_mma_plan_of_the_benchmark_layers():
    """The chunks per split measured fastest on an H200 at four tokens (docs/KERNELS.md v21), 1 to 8 swept per
    layer: the model's choice for each of the eight layers."""
    fastest = {(4096, 6144): 2, (4096, 4096): 1, (4096, 28672): 8, (14336, 4096): 4,
               (8192, 10240): 5, (8192, 8192): 4, (8192, 57344): 7, (28672, 8192): 7}
    with mock.patch("codegemm.ops.triton_psumbook.sm_count", return_value=132):
        for (k, n), per_split in fastest.items():
            tiles, splits = cuda.plan_psumbook_mma(n, k, torch.device("cpu"))
            chunks = k // cuda.MMA_CHUNK_INPUTS
            assert tiles == 4 and splits == -(-chunks // per_split), (k, n)


def test_psumbook_mma_time_model_hands_blocks_to_the_first_free_slot():
    # 3 row blocks x 2 splits of 2 chunks on 4 slots: four blocks at once, then two more on the freed slots.
    one_block = cuda._PMMA_BLOCK_START_US + 2 * cuda._PMMA_CHUNK_US
    partial = cuda._PMMA_REDUCE_US_PER_MB * 2 * 10 * cuda.PSUMBOOK_MMA_MAX_TOKENS * 4 / 1e6
    assert cuda._psumbook_mma_time(3, 4, 2, 4, 10) == pytest.approx(2 * one_block + partial)
    assert cuda._psumbook_mma_time(3, 4, 4, 4, 10) == pytest.approx(cuda._PMMA_BLOCK_START_US + 4 * cuda._PMMA_CHUNK_US)


def test_psumbook_mma_takes_fp16_tiled_calls_of_up_to_four_tokens():
    for tokens, dtype, tiled, fits in [(2, torch.float16, True, True), (4, torch.float16, True, True),
                                       (5, torch.float16, True, False), (2, torch.bfloat16, True, False),
                                       (2, torch.float16, False, False)]:
        assert cuda.psumbook_mma_fits(torch.zeros(tokens, 128, dtype=dtype), tiled) is fits
    x = torch.zeros(3, 128, dtype=torch.float16)
    assert cuda.psumbook_mma_chosen(x, torch.zeros(2, 256, 8, dtype=torch.float16), True)
    assert not cuda.psumbook_mma_chosen(x, torch.zeros(1, 256, 4, dtype=torch.float16), True)  # faster on the other


@pytest.mark.slow
@pytest.mark.skipif(cuda._nvcc() is None, reason="needs nvcc")
def test_built_library_loads_and_declares_its_entry_points(tmp_path, monkeypatch):
    """nvcc builds the kernels without a GPU; the library then loads and answers through ctypes."""
    monkeypatch.setenv("CODEGEMM_CUDA_CACHE", str(tmp_path))
    lib = cuda.bind_library(cuda.build("sm_90"))
    assert lib.codegemm_error_string(0) == b"no error"
    assert lib.codegemm_psumbook.argtypes == lib.codegemm_codebook_mma.argtypes == lib.codegemm_psumbook_mma.argtypes


def test_tables_settled_only_while_capturing_and_unchanged(monkeypatch):
    from codegemm.ops.cuda import settled

    table = torch.zeros(8)
    assert not settled.tables_settled([table])  # not capturing (no GPU here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    fresh = torch.zeros(8)
    assert not settled.tables_settled([fresh])  # first sight
    assert settled.tables_settled([fresh]) and settled.tables_settled([table, fresh])
    fresh[2:4].fill_(1.0)  # an in-place write through a view
    assert not settled.tables_settled([table, fresh])
    assert settled.tables_settled([table, fresh])
    with torch.inference_mode():
        frozen = torch.zeros(8)
    assert not settled.tables_settled([frozen]) and not settled.tables_settled([frozen])
    count = len(settled._versions)
    del fresh
    assert len(settled._versions) == count - 1
