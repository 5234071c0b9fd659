"""Decoder-block sums of `codegemm bench kernels` (pure arithmetic, no GPU)."""

from __future__ import annotations

import pytest

from codegemm.bench.kernels import FP16, Row, _block_sums
from codegemm.shapes import DECODER_BLOCKS


def _row(layer: str, kernel: str, us: float, tokens: int = 1) -> Row:
    return Row("llama3-8b", layer, 4096, 4096, tokens, kernel, us, us, us, 1000, 1)


def test_sibling_rows_complete_their_block_with_the_plain_kernel():
    rows = [_row(layer, FP16, 10.0) for layer in ("qkv", "o", "gate_up", "down")]
    rows += [_row(layer, "codegemm-m2v8g128", us) for layer, us in (("qkv", 3), ("o", 2), ("gate_up", 5), ("down", 4))]
    rows += [_row("qkv", "codegemm-m2v8g128-grouped", 3.5), _row("gate_up", "codegemm-m2v8g128-grouped", 5.5)]
    rows += [_row("qkv", "codegemm-m2v8g128-separate", 6.0), _row("gate_up", "codegemm-m2v8g128-separate", 7.0)]
    sums = {s["kernel"]: s for s in _block_sums(rows)}
    assert sums[FP16]["us"] == 40 and sums["codegemm-m2v8g128"]["us"] == 14
    assert sums["codegemm-m2v8g128-grouped"]["us"] == pytest.approx(3.5 + 2 + 5.5 + 4)
    assert sums["codegemm-m2v8g128-grouped"]["layers"] == 4
    assert sums["codegemm-m2v8g128-separate"]["speedup"] == pytest.approx(40 / (6 + 2 + 7 + 4))


def test_fused_shapes_name_their_parts():
    for shapes in DECODER_BLOCKS.values():
        for shape in shapes:
            assert not shape.parts or sum(shape.parts) == shape.out_features, shape
