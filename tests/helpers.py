"""Random quantized tensors and error metrics shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from codegemm import CodebookConfig


def random_quantized(
    config: CodebookConfig,
    out_features: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random ``(codes, codebooks, scales)``; scales strictly positive and varied."""
    num_vectors = in_features // config.vec_len
    codes = torch.randint(
        0, config.codebook_size, (out_features, num_vectors, config.num_codebooks), generator=generator
    )
    codebooks = torch.randn(config.num_codebooks, config.codebook_size, config.vec_len, generator=generator)
    scales = 0.5 + torch.rand(out_features, config.num_groups(in_features), generator=generator)
    return codes.to(device), codebooks.to(device, dtype), scales.to(device, dtype)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN never passes a ``<=`` check."""
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm())


def triton_device() -> str:
    """Where Triton kernels run in this session; skips the calling test module when nowhere."""
    import pytest

    pytest.importorskip("triton")
    from codegemm.ops.triton_dequant import interpreting

    if torch.cuda.is_available():
        return "cuda"
    if not interpreting():
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
    return "cpu"


TINY_LLAMA_FIELDS = dict(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A Llama config small enough for CPU tests; ``overrides`` replace fields."""
    return LlamaConfig(**{**TINY_LLAMA_FIELDS, **overrides})


def assert_compiled_graph_matches_eager(model: torch.nn.Module, x: torch.Tensor) -> None:
    """``torch.compile(fullgraph=True)`` of ``model`` equals eager on ``x``, and a CUDA graph captured from the
    compiled model and replayed on fresh inputs equals eager on them."""
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, rtol=2e-3, atol=2e-3)
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            compiled(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = compiled(static_x)
        fresh = torch.randn_like(x)
        static_x.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(static_out, model(fresh), rtol=2e-3, atol=2e-3)


CUDA_SWEEP_CONFIGS = ["m2v8g128", "m1v4g128", "m2v8", "m2v8g256", "m1v4g512"]
"""Configs the CUDA kernel sweeps cover: both compiled configs, per-row scales, larger groups."""
CUDA_SWEEP_SHAPES = [(1000, 1024), (4096, 384), (16, 128), (4099, 2176)]
"""(N, K) of the CUDA kernel sweeps: tails in N, K of 1-17 chunks."""


def sweep_config(name: str, k: int) -> CodebookConfig:
    """The sweep's config, skipping the (name, K) pairs whose scale group does not divide K."""
    config = CodebookConfig.from_name(name)
    if k % (config.group_size or k):
        pytest.skip("group does not divide K")
    return config


def seeded_cuda_layer(config: CodebookConfig, n: int, k: int, seed: int = 0, centroid_scale: float = 1.0,
                      scale: float = 0.02) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random 8-bit-code layer ``(codes, codebooks, scales)`` on the GPU, reproducible from ``seed``."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 256, (n, k // config.vec_len, config.num_codebooks), device=device, generator=gen,
                          dtype=torch.int32).to(torch.uint8)
    codebooks = (torch.randn(config.num_codebooks, 256, config.vec_len, device=device, generator=gen)
                 * centroid_scale).half()
    scales = (0.5 + torch.rand(n, config.num_groups(k), device=device, generator=gen)).mul_(scale).half()
    return codes, codebooks, scales


def assert_grouped_decode_matches_separate(seed: int) -> torch.nn.Module:
    """Decode a small fp16 m2v8g128 Llama on the GPU with siblings grouped (and gated MLPs fused) and without, both
    compiled and graph-replayed; the logits and the first greedy tokens must agree. Returns the grouped model."""
    from codegemm.generation import FastGenerator
    from codegemm.random_model import build_random_quantized_model

    hf = tiny_llama_config(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                           eos_token_id=None, bos_token_id=None, pad_token_id=0)
    model = build_random_quantized_model(hf, "m2v8g128", device="cuda", dtype=torch.float16, seed=seed)
    model.generation_config.eos_token_id = None
    prompt = torch.randint(1, 512, (2, 9), device="cuda")
    separate = FastGenerator(model, group_siblings=False).generate(prompt, 12, keep_logits=True)
    grouped = FastGenerator(model).generate(prompt, 12, keep_logits=True)
    assert rel_error(grouped.logits, separate.logits.double()) <= 2e-2
    # Greedy tokens agree until the first near-tie of the two (differently summed) logit sets.
    same = (grouped.new_tokens == separate.new_tokens).all(dim=0).long().cumprod(0).sum().item()
    assert same >= 4, f"grouped and separate decoding diverged after {same} tokens"
    return model
