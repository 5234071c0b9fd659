"""`codegemm bench kernels` pieces that need no GPU: block sums, and the --siblings rows with timing faked."""

from __future__ import annotations

import argparse

import pytest
import torch

from codegemm import reference
from codegemm.bench import kernels
from codegemm.bench.kernels import FP16, Row, _block_sums
from codegemm.bench.timing import Timing
from codegemm.ops import dispatch
from codegemm.ops.dispatch import Backend, KernelSpec, register_grouped_kernel
from codegemm.shapes import DECODER_BLOCKS, LinearShape


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


@pytest.mark.parametrize("grouped_kernel", [False, True])
def test_sibling_rows_separate_and_grouped(monkeypatch, grouped_kernel):
    monkeypatch.setattr(dispatch, "_GROUPED_KERNELS", [])
    if grouped_kernel:  # stands in for the CUDA one: the reference per layer, side by side
        register_grouped_kernel(KernelSpec("cpu_test", Backend.CPU, lambda *_: True, lambda x, layers, bias: torch.cat(
            [reference.psumbook_matmul(x, *layer, None, torch.float32) for layer in layers], dim=1).to(x.dtype)))
    calls: list[int] = []

    def fake_time(fns, replays):
        calls.append(len(fns))
        for fn in fns:
            fn()
        return Timing(median_us=5.0, p20_us=4.0, p80_us=6.0, replays=replays, graph=False)

    monkeypatch.setattr(kernels, "time_calls", fake_time)
    monkeypatch.setattr(kernels, "rotation_count", lambda nbytes, device: 2)
    args = argparse.Namespace(no_check=False, replays=3)
    shape = LinearShape("qkv", 64, 96, (64, 16, 16))
    rows = kernels._bench_siblings("tiny", shape, [1, 3], ["m2v8g32"], torch.float32, args, torch.device("cpu"))
    names = [(r.tokens, r.kernel) for r in rows]
    expected = [(t, f"codegemm-m2v8g32{s}") for t in (1, 3) for s in ("-separate", "-grouped")[: 1 + grouped_kernel]]
    assert names == expected and calls == [2] * len(expected)
    assert all(r.n == 96 and r.rel_err < 1e-5 and r.us == 5.0 for r in rows)
