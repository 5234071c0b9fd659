"""One table of real matmul shapes, shared by tests and benchmarks.

Each entry is ``(name, in_features K, out_features N)`` of one linear of a
decoder block, with the fused projections that inference engines use
(qkv, gate_up). ``parts`` are the separate layers a fused one stands for
(q, k, v; gate, up): a quantized checkpoint stores them with their own codebooks.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int
    parts: tuple[int, ...] = ()


DECODER_BLOCKS: dict[str, tuple[LinearShape, ...]] = {
    "llama3-8b": (
        LinearShape("qkv", 4096, 6144, (4096, 1024, 1024)),
        LinearShape("o", 4096, 4096),
        LinearShape("gate_up", 4096, 28672, (14336, 14336)),
        LinearShape("down", 14336, 4096),
    ),
    "llama3-70b": (
        LinearShape("qkv", 8192, 10240, (8192, 1024, 1024)),
        LinearShape("o", 8192, 8192),
        LinearShape("gate_up", 8192, 57344, (28672, 28672)),
        LinearShape("down", 28672, 8192),
    ),
    "gemma3-270m": (
        LinearShape("qkv", 640, 1536, (1024, 256, 256)),
        LinearShape("o", 1024, 640),
        LinearShape("gate_up", 640, 4096, (2048, 2048)),
        LinearShape("down", 2048, 640),
    ),
}

BENCH_TOKENS = (1, 4, 8, 16)
TEST_TOKENS = (1, 3, 16, 53)
