"""The reference itself against an independent naive loop, and its two forms against each other."""

import itertools

import pytest
import torch

from codegemm import CodebookConfig, reference
from helpers import random_quantized, rel_error


def naive_weight(codes, codebooks, scales, group_size):
    """Element-by-element reading of the math contract, in float64."""
    n, num_vectors, m = codes.shape
    v = codebooks.shape[2]
    k = num_vectors * v
    weight = torch.zeros(n, k, dtype=torch.float64)
    for row, j, t in itertools.product(range(n), range(num_vectors), range(v)):
        col = j * v + t
        group = 0 if group_size is None else col // group_size
        total = sum(float(codebooks[i, codes[row, j, i], t]) for i in range(m))
        weight[row, col] = float(scales[row, group]) * total
    return weight


@pytest.mark.parametrize("name, n, k", [("m2b3v2g4", 3, 8), ("m1b2v4", 5, 12), ("m3b2v2g2", 2, 6)])
def test_dequantize_matches_naive_loop(name, n, k):
    config = CodebookConfig.from_name(name)
    codes, codebooks, scales = random_quantized(config, n, k, torch.float64)
    expected = naive_weight(codes, codebooks, scales, config.group_size)
    assert torch.equal(reference.dequantize(codes, codebooks, scales, torch.float64), expected)
    x = torch.randn(4, k, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    y = reference.psumbook_matmul(x, codes, codebooks, scales, bias)
    assert rel_error(y, x @ expected.T + bias) < 1e-12


def test_psumbook_entries_are_inner_products():
    codebooks = torch.randn(2, 16, 4, dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    psum = reference.psumbook(x, codebooks)
    assert psum.shape == (3, 3, 2, 16)
    assert torch.allclose(psum[2, 1, 1, 5], x[2, 4:8] @ codebooks[1, 5])


@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128", "m4b2v2g16", "m2b6v16", "m3b5v4g8"])
@pytest.mark.parametrize("tokens", [1, 3, 16, 53])
def test_psumbook_matmul_equals_dense(name, tokens):
    config = CodebookConfig.from_name(name)
    k = 256
    codes, codebooks, scales = random_quantized(config, 37, k, torch.float64)
    x = torch.randn(tokens, k, dtype=torch.float64)
    got = reference.psumbook_matmul(x, codes, codebooks, scales)
    want = reference.dense_matmul(x, codes, codebooks, scales)
    assert rel_error(got, want) < 1e-12
