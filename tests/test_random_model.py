"""Random quantized models (codegemm.random_model): seeded, realistic, no dense allocation."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import tiny_llama_config
from torch import nn
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from codegemm import CodebookConfig, CodeGEMMLinear, ConfigError, DTypeError, reference
from codegemm.bench.archs import architecture_config
from codegemm.random_model import build_random_quantized_model, fill_random_, quantize_random, random_layer_tensors
from codegemm.surgery import quantized_modules


@pytest.fixture(scope="module")
def tiny_model():
    return build_random_quantized_model(tiny_llama_config(), "m2v8g32", device="cpu", dtype=torch.float32, seed=7)


def test_tiny_llama_forward_is_finite_and_every_linear_but_lm_head_is_quantized(tiny_model):
    quantized = [name for name, _ in quantized_modules(tiny_model)]
    assert len(quantized) == 2 * 7
    assert isinstance(tiny_model.lm_head, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for n, m in tiny_model.named_modules() if n != "lm_head")
    ids = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        logits = tiny_model(ids).logits
    assert logits.shape == (2, 11, 320)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_magnitudes_are_realistic(tiny_model):
    for name, layer in quantized_modules(tiny_model):
        std = float(layer.dequantize(torch.float32).std())
        assert 0.017 < std < 0.023, (name, std)
        assert bool((layer.scales > 0).all())
    assert 0.017 < float(tiny_model.model.embed_tokens.weight.std()) < 0.023
    assert 0.017 < float(tiny_model.lm_head.weight.std()) < 0.023
    assert torch.equal(tiny_model.model.norm.weight, torch.ones(128))
    assert torch.equal(tiny_model.model.layers[1].input_layernorm.weight, torch.ones(128))


def test_codes_are_uniform_over_the_codebook(tiny_model):
    codes = torch.cat([layer.codes.long().flatten() for _, layer in quantized_modules(tiny_model)])
    counts = torch.bincount(codes, minlength=256).double()
    assert codes.max() == 255 and codes.min() == 0
    expected = codes.numel() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert 120 < chi2 < 390  # chi-square with 255 degrees of freedom: 255 +- 6 sigma


def test_rotary_buffers_match_a_normally_built_model(tiny_model):
    reference = AutoModelForCausalLM.from_config(tiny_llama_config())
    ours = dict(tiny_model.named_buffers())
    for name, buf in reference.named_buffers():
        assert buf.dtype == ours[name].dtype, name
        assert torch.equal(buf, ours[name]), name


def test_seeded(tiny_model):
    again = build_random_quantized_model(tiny_llama_config(), "m2v8g32", device="cpu", dtype=torch.float32, seed=7)
    other = build_random_quantized_model(tiny_llama_config(), "m2v8g32", device="cpu", dtype=torch.float32, seed=8)
    state, same, different = tiny_model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert not torch.equal(state["model.layers.0.mlp.up_proj.codes"], different["model.layers.0.mlp.up_proj.codes"])
    assert not torch.equal(state["model.embed_tokens.weight"], different["model.embed_tokens.weight"])


def test_dtype_skip_and_bias():
    hf_config = tiny_llama_config(attention_bias=True)
    model = build_random_quantized_model(
        hf_config, CodebookConfig(1, 8, 4, None), device="cpu", dtype=torch.bfloat16, seed=0, skip=["o_proj"]
    )
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, CodeGEMMLinear) and q.scales.shape == (128, 1)
    assert q.bias is not None and q.bias.dtype == torch.bfloat16 and float(q.bias.abs().sum()) > 0
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.randint(0, 320, (1, 5))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_tied_embeddings_and_zero_centred_norms_survive():
    hf_config = Gemma3TextConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=64,
        sliding_window=8,
    )
    model = build_random_quantized_model(hf_config, "m1v4g32", device="cpu", dtype=torch.float32, seed=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.norm.weight, torch.zeros(64))  # Gemma's norm multiplies by (1 + weight)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 300, (1, 6))).logits).all()


def test_llama3_70b_on_meta_allocates_nothing_and_is_fast():
    start = time.perf_counter()
    config = architecture_config("llama3-70b")
    model = build_random_quantized_model(config, "m2v8g128", device="meta", dtype=torch.float16)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"building a 70B model on meta took {elapsed:.1f} s"
    real_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.is_meta)
    assert real_bytes == 0
    down = model.model.layers[79].mlp.down_proj
    assert isinstance(down, CodeGEMMLinear)
    assert down.codes.shape == (8192, 28672 // 8, 2) and down.scales.shape == (8192, 28672 // 128)
    weights = sum(layer.in_features * layer.out_features for _, layer in quantized_modules(model))
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.endswith((".codebooks", ".scales")))
    assert 69.5e9 < weights + dense < 71.5e9  # Llama-3-70B has 70.6 B parameters


def test_quantize_random_on_an_existing_module():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16, bias=False))
    names = quantize_random(model, "m2v4g16", dtype=torch.float32, seed=3, weight_std=0.05)
    assert names == ["0", "2"]
    std = float(model[0].dequantize().std())
    assert 0.04 < std < 0.06
    out = model(torch.randn(5, 64))
    assert out.shape == (5, 16) and torch.isfinite(out).all()


def test_fill_random_on_meta_sets_shapes_only():
    layer = CodeGEMMLinear(64, 48, "m2b6v8g32", bias=True, device="meta")
    fill_random_(layer, None, "meta", torch.float16)
    assert layer.codes.is_meta and layer.codes.shape == (48, 8, 2)
    assert layer.codebooks.shape == (2, 64, 8) and layer.bias.shape == (48,)


def test_bad_arguments_are_refused():
    with pytest.raises(DTypeError, match="dtype"):
        build_random_quantized_model(tiny_llama_config(), "m2v8g32", dtype=torch.int8)
    with pytest.raises(ConfigError, match="name must look like"):
        build_random_quantized_model(tiny_llama_config(), "2bit")
    with pytest.raises(ConfigError, match="seed"):
        build_random_quantized_model(tiny_llama_config(), "m2v8g32", seed=1.5)
    with pytest.raises(ConfigError, match="weight_std"):
        quantize_random(nn.Linear(16, 16), "m1v8", weight_std=-1.0)
    with pytest.raises(ConfigError, match="multiple of group_size"):
        build_random_quantized_model(tiny_llama_config(), "m2v8g256")


def test_random_layer_tensors_for_benchmarks():
    generator = torch.Generator().manual_seed(0)
    codes, codebooks, scales = random_layer_tensors("m2v8g128", 48, 256, "cpu", torch.float16, generator)
    assert codes.dtype == torch.uint8 and codes.shape == (48, 32, 2)
    assert codebooks.dtype == torch.float16 and codebooks.shape == (2, 256, 8)
    assert scales.dtype == torch.float16 and scales.shape == (48, 2) and bool((scales > 0).all())
    weight = reference.dequantize(codes, codebooks, scales)
    assert 0.01 < float(weight.std()) < 0.04
    again = random_layer_tensors("m2v8g128", 48, 256, "cpu", torch.float16, generator)
    assert not torch.equal(codes, again[0])
