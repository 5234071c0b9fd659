"""Sibling grouping (q/k/v, gate/up in one launch) on CPU, through a stand-in grouped kernel.

No grouped kernel runs on the CPU, so these tests register one built from the reference (the spec) and
check what grouping must guarantee: the same outputs as every layer alone, one grouped call per sibling
set, correct results when a sibling gets another input, and the same behaviour under
``torch.compile(fullgraph=True)`` and in the fast generator. The CUDA grouped kernel itself is tested
against the reference in tests/test_grouped_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama_config

from codegemm import CodeGEMMLinear, reference, siblings
from codegemm.errors import ConfigError
from codegemm.generation import FastGenerator
from codegemm.ops import dispatch
from codegemm.ops.dispatch import Backend, KernelSpec, grouped_matmul, register_grouped_kernel
from codegemm.random_model import build_random_quantized_model
from codegemm.siblings import SiblingGroup, fuse_siblings, unfuse_siblings


@pytest.fixture
def grouped_calls(monkeypatch):
    """Register a CPU grouped kernel (the reference per layer, side by side); yields its call log."""
    monkeypatch.setattr(dispatch, "_GROUPED_KERNELS", [])
    monkeypatch.setattr(siblings, "SEGMENT_ROW_MULTIPLE", 1)  # tiny layers, no CUDA blocks to align to
    calls: list[list[int]] = []

    def spec_fn(x, layers, bias):
        calls.append([codes.shape[0] for codes, _, _ in layers])
        out = torch.cat([reference.psumbook_matmul(x, *layer, None, torch.float32) for layer in layers], dim=1)
        return (out if bias is None else out + bias.float()).to(x.dtype)

    register_grouped_kernel(KernelSpec("cpu_test", Backend.CPU, lambda dev, cfg, t, dt: dev.type == "cpu", spec_fn))
    return calls


def _model(seed: int = 3, **overrides):
    config = tiny_llama_config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                               **overrides)
    model = build_random_quantized_model(config, "m2v8g32", device="cpu", dtype=torch.float32, seed=seed)
    model.generation_config.eos_token_id = None
    return model


def test_grouped_model_equals_separate_layers_with_one_call_per_set(grouped_calls):
    model = _model()
    ids = torch.randint(0, 320, (2, 7))
    with torch.no_grad():
        separate = model(ids).logits
        assert fuse_siblings(model) == 4  # 2 layers x (q/k/v, gate/up)
        assert fuse_siblings(model) == 0  # idempotent
        grouped = model(ids).logits
    assert grouped_calls == [[64, 32, 32], [128, 128]] * 2
    torch.testing.assert_close(grouped, separate, rtol=1e-5, atol=1e-5)
    grouped_calls.clear()
    unfuse_siblings(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, separate, rtol=0, atol=0)
    assert grouped_calls == []


def test_no_grouped_kernel_means_each_layer_alone(monkeypatch):
    monkeypatch.setattr(dispatch, "_GROUPED_KERNELS", [])
    model = _model()
    ids = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        separate = model(ids).logits
        fuse_siblings(model)
        torch.testing.assert_close(model(ids).logits, separate, rtol=0, atol=0)


def test_sibling_with_another_input_runs_alone(grouped_calls):
    layers = [CodeGEMMLinear.from_unpacked(*_layer_tensors(n, seed), bias=torch.randn(n)) for seed, n in
              enumerate((16, 8, 8))]
    group_members = layers
    fuse_siblings_of(group_members)
    x, other = torch.randn(3, 32), torch.randn(3, 32)
    with torch.no_grad():
        q = layers[0](x)
        k = layers[1](other)  # not the input q's call computed the group for
        v = layers[2](x)
        for layer, inp, out in zip(layers, (x, other, x), (q, k, v)):
            want = reference.psumbook_matmul(inp, layer.codes, layer.codebooks, layer.scales, layer.bias,
                                             torch.float32)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert grouped_calls == [[16, 8, 8]]


def _layer_tensors(n: int, seed: int, k: int = 32):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k // 8, 2), generator=gen)
    codebooks = torch.randn(2, 256, 8, generator=gen)
    scales = torch.rand(n, k // 16, generator=gen) + 0.5
    return codes, codebooks, scales


def fuse_siblings_of(layers):
    parent = torch.nn.Module()
    for name, layer in zip(("q_proj", "k_proj", "v_proj"), layers):
        parent.add_module(name, layer)
    assert fuse_siblings(parent) == 1


def test_compiled_fullgraph_matches_eager(grouped_calls):
    model = _model(seed=5)
    fuse_siblings(model)
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    groups = {id(m._siblings): m._siblings for m in model.modules() if getattr(m, "_siblings", None) is not None}
    assert len(groups) == 4 and all(g._pending is None for g in groups.values())  # every output was taken


def test_fast_generator_groups_and_keeps_greedy_tokens(grouped_calls):
    plain = _model(seed=7)
    prompt = torch.randint(1, 320, (2, 5))
    separate = FastGenerator(plain, group_siblings=False).generate(prompt, 6).sequences
    assert grouped_calls == []
    grouped = FastGenerator(plain).generate(prompt, 6).sequences
    assert grouped_calls  # the decode steps went through the grouped kernel
    assert torch.equal(grouped, separate)


def test_group_validation_names_the_problem():
    a = CodeGEMMLinear.from_unpacked(*_layer_tensors(8, 0))
    b = CodeGEMMLinear.from_unpacked(*_layer_tensors(8, 1, k=64))
    with pytest.raises(ConfigError, match="in_features"):
        SiblingGroup([a, b])
    with pytest.raises(ConfigError, match="2 to 4"):
        SiblingGroup([a])
    with pytest.raises(ConfigError, match="CodeGEMMLinear"):
        SiblingGroup([a, torch.nn.Linear(32, 8)])
    parent = torch.nn.Module()
    parent.gate_proj, parent.up_proj = a, b
    assert fuse_siblings(parent) == 0  # mismatched siblings simply stay separate


def test_grouped_matmul_respects_reference_backend(grouped_calls):
    codes, codebooks, scales = _layer_tensors(8, 0)
    x = torch.randn(2, 32)
    cfg = CodeGEMMLinear.from_unpacked(codes, codebooks, scales).config
    assert grouped_matmul(x, [(codes, codebooks, scales)] * 2, None, cfg, Backend.REFERENCE) is None
    assert grouped_matmul(x, [(codes, codebooks, scales)] * 2, None, cfg, Backend.CPU).shape == (2, 16)


def test_sizes_off_block_boundaries_stay_separate():
    model = _model()
    assert fuse_siblings(model) == 0  # 64/32/32 and 128/128 rows: not multiples of 1024
    assert fuse_siblings(model, row_multiple=32) == 4
    unfuse_siblings(model)
    parent = torch.nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = (CodeGEMMLinear.from_unpacked(*_layer_tensors(n, i)) for i, n in
                                                  enumerate((1024, 1024, 8)))
    assert fuse_siblings(parent) == 1  # the last layer may have any size


def test_grouped_op_rejects_bad_lists_before_any_kernel():
    from codegemm.errors import ShapeError
    from codegemm.ops.custom_ops import grouped_cuda_mm

    codes, codebooks, scales = _layer_tensors(8, 0)
    codes = codes.to(torch.uint8)
    x = torch.randn(2, 32, dtype=torch.float16)
    with pytest.raises(ShapeError, match="equal, non-zero length"):
        grouped_cuda_mm(x, [codes, codes], [codebooks], [scales])
    with pytest.raises(ShapeError, match="in_features=32"):
        grouped_cuda_mm(torch.randn(2, 64, dtype=torch.float16), [codes], [codebooks], [scales])
    with pytest.raises(ShapeError, match="sum of out_features=16"):
        grouped_cuda_mm(x, [codes, codes], [codebooks] * 2, [scales] * 2, torch.zeros(8, dtype=torch.float16))


def test_sibling_offloaded_to_meta_runs_alone(grouped_calls):
    layers = [CodeGEMMLinear.from_unpacked(*_layer_tensors(n, seed)) for seed, n in enumerate((16, 8, 8))]
    fuse_siblings_of(layers)
    layers[1].codes = layers[1].codes.to("meta")  # what accelerate's disk/CPU offload leaves between calls
    x = torch.randn(2, 32)
    with torch.no_grad():
        out = layers[0](x)
    want = reference.psumbook_matmul(x, layers[0].codes, layers[0].codebooks, layers[0].scales, None, torch.float32)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert grouped_calls == []


@pytest.fixture
def gated_calls(monkeypatch, grouped_calls):
    """The stand-in grouped kernel of ``grouped_calls`` with a fused gated form too; yields the gated call log."""
    from codegemm.ops.custom_ops import gate
    from codegemm.ops.cuda import GATE_ACTS

    plain = dispatch._GROUPED_KERNELS[0]
    calls: list[str] = []

    def gated_fn(x, layers, bias, act, tiled=False):
        calls.append(act)
        return gate(plain.fn(x, layers, bias), GATE_ACTS[act])

    register_grouped_kernel(KernelSpec("cpu_test", Backend.CPU, plain.supports, plain.fn, gated_fn=gated_fn))
    return calls


def test_gated_mlp_runs_gate_up_and_activation_as_one_call(gated_calls, grouped_calls):
    model = _model(seed=9)
    ids = torch.randint(0, 320, (2, 7))
    with torch.no_grad():
        separate = model(ids).logits
        fuse_siblings(model)
        fused = model(ids).logits
    assert gated_calls == ["silu", "silu"]  # one per decoder layer
    assert grouped_calls == [[64, 32, 32], [128, 128]] * 2  # the stand-in's gated form calls its grouped one
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    torch.testing.assert_close(compiled, fused, rtol=1e-5, atol=1e-5)
    unfuse_siblings(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    gated_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, separate, rtol=0, atol=0)
    assert gated_calls == []


def test_gated_mlp_keeps_autograd_on_the_unfused_path(gated_calls):
    model = _model(seed=4)
    fuse_siblings(model)
    for layer in model.modules():
        if isinstance(layer, CodeGEMMLinear):
            layer.scales.requires_grad_(True)
    model(torch.randint(0, 320, (1, 5))).logits.sum().backward()
    assert gated_calls == []  # training needs gradients, which only the unfused layers give


def test_gated_activation_is_recognised_by_what_it_computes():
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    from codegemm.siblings import gated_activation

    llama = LlamaMLP(tiny_llama_config(hidden_size=16, intermediate_size=32))
    gemma = Gemma3MLP(Gemma3TextConfig(hidden_size=16, intermediate_size=32, hidden_activation="gelu_pytorch_tanh"))
    assert gated_activation(llama) == "silu"
    assert gated_activation(gemma) == "gelu_tanh"
    llama.act_fn = torch.nn.ReLU()
    assert gated_activation(llama) is None

    class OtherMLP(torch.nn.Module):
        act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)))

    assert gated_activation(OtherMLP()) is None


def test_gated_op_rejects_bad_arguments_before_any_kernel():
    from codegemm.ops.custom_ops import gated_cuda_mm

    codes, codebooks, scales = _layer_tensors(16, 0)
    codes = codes.to(torch.uint8)
    x = torch.randn(1, 32)
    with pytest.raises(ConfigError, match="act must be one of"):
        gated_cuda_mm(x, [codes, codes], [codebooks, codebooks], [scales, scales], None, False, "relu")
    with pytest.raises(ValueError, match="gate and the up layer"):
        gated_cuda_mm(x, [codes], [codebooks], [scales], None, False, "silu")
    small = _layer_tensors(8, 1)
    with pytest.raises(ValueError, match="equal out_features"):
        gated_cuda_mm(x, [codes, small[0].to(torch.uint8)], [codebooks, small[1]], [scales, small[2]], None, False,
                      "silu")
