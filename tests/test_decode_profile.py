"""The decode profile's report: categories and the overlap of dependent launches, checked without a GPU."""

from __future__ import annotations

from codegemm.bench.decode_profile import categorize, format_profile


def test_our_kernels_count_as_quantized_matmuls():
    assert categorize("void (anonymous namespace)::codebook_mma_kernel<2, 8, 2, 2, __half, 256>(") == "matmul_quantized"
    assert categorize("void (anonymous namespace)::split_reduce_kernel<__half>(float const*") == "matmul_quantized"
    assert categorize("nvjet_sm90_hsh_512x16_64x3_2x1_v_bz_TNT") == "matmul_dense"


def test_overlapping_kernels_are_reported_as_overlap_not_negative_gaps():
    report = {"step_us": 100.0, "kernel_us": 130.0, "gap_us": 0.0, "overlap_us": 30.0, "kernels_per_step": 4.0,
              "by_category_us": {"matmul_quantized": 130.0},
              "top_kernels_us": [{"name": "codebook_mma_kernel", "us": 130.0, "calls_per_step": 4.0}]}
    text = format_profile("codegemm", 16, report)
    assert "idle gaps 0 us" in text and "overlap by 30 us" in text
    del report["overlap_us"]  # reports written before the field existed
    assert "overlap" not in format_profile("codegemm", 16, report)
