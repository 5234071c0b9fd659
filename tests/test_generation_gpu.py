"""The compiled, graph-replayed decode step on CUDA: same logits as eager, same greedy tokens as generate."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from codegemm.generation import FastGenerator, SamplingParams
from codegemm.random_model import build_random_quantized_model

pytestmark = pytest.mark.gpu

VOCAB = 1000


def _model(dtype: torch.dtype, seed: int = 0):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=640, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=None, bos_token_id=None, pad_token_id=0,
    )
    model = build_random_quantized_model(config, "m2v8g128", device="cuda", dtype=dtype, seed=seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=gen).cuda()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 4])
def test_compiled_step_matches_eager_logits(dtype, tol, batch):
    model = _model(dtype)
    ids = _prompt(batch, 9, seed=batch)
    eager = FastGenerator(model, compile=False, cuda_graph=False).generate(ids, 12, keep_logits=True)
    fast_gen = FastGenerator(model)
    fast = fast_gen.generate(ids, 12, keep_logits=True)
    assert fast_gen._state is not None and fast_gen._state.graphs, "the decode step was not captured"
    # Compare while both runs have fed the same tokens (fp16 fusion may flip a near-tie later).
    same = (fast.new_tokens == eager.new_tokens).all(dim=0).long().cumprod(0).sum().item()
    assert same >= 6
    for step in range(min(same + 1, 12)):
        assert _rel(fast.logits[:, step], eager.logits[:, step]) < tol, f"step {step}"


def test_bf16_model_with_fp16_tables_runs_the_cuda_kernels_and_matches_eager():
    """A checkpoint quantized as the CLI stores it (fp16 codebooks and scales) loaded in bf16, codegemm generate's CUDA
    default: the tables stay fp16 (codegemm.hf.checkpoint.keep_stored_table_dtypes), so the layers take the CUDA
    kernels with bf16 activations; the captured step matches eager."""
    from codegemm.ops.cuda import cuda_psumbook_eligible
    from codegemm.quant.driver import cast_quantized
    from codegemm.surgery import quantized_modules

    model = _model(torch.bfloat16, seed=5)
    cast_quantized(model, torch.float16)
    _, layer = next(quantized_modules(model))
    x = torch.randn(1, layer.in_features, device="cuda", dtype=torch.bfloat16)
    assert cuda_psumbook_eligible(x, layer.codes, layer.codebooks, layer.scales, layer.bias, False)
    ids = _prompt(2, 9, seed=8)
    eager = FastGenerator(model, compile=False, cuda_graph=False).generate(ids, 10, keep_logits=True)
    fast = FastGenerator(model).generate(ids, 10, keep_logits=True)
    same = (fast.new_tokens == eager.new_tokens).all(dim=0).long().cumprod(0).sum().item()
    assert same >= 5
    for step in range(min(same + 1, 10)):
        assert _rel(fast.logits[:, step], eager.logits[:, step]) < 3e-2, f"step {step}"


def test_model_attention_path_matches_eager_logits():
    """The captured step with the model's own SDPA attention (decode attention off) also matches eager."""
    model = _model(torch.float16, seed=4)
    ids = _prompt(2, 9, seed=7)
    eager = FastGenerator(model, compile=False, cuda_graph=False).generate(ids, 10, keep_logits=True)
    gen = FastGenerator(model, decode_attention=False)
    fast = gen.generate(ids, 10, keep_logits=True)
    assert not gen.decode_attention
    same = (fast.new_tokens == eager.new_tokens).all(dim=0).long().cumprod(0).sum().item()
    assert same >= 5
    for step in range(min(same + 1, 10)):
        assert _rel(fast.logits[:, step], eager.logits[:, step]) < 2e-2, f"step {step}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,cache_len", [(1, 32, 8, 256), (4, 64, 8, 4096), (16, 32, 8, 640)])
def test_decode_attention_kernel_on_gpu(dtype, batch, heads, kv_heads, cache_len):
    from codegemm.generation.attention import decode_attention

    dim = 128
    query = torch.randn(batch, 1, heads, dim, device="cuda", dtype=dtype).transpose(1, 2)
    key = torch.randn(batch, kv_heads, cache_len, dim, device="cuda", dtype=dtype)
    value = torch.randn(batch, kv_heads, cache_len, dim, device="cuda", dtype=dtype)
    lengths = torch.randint(1, cache_len + 1, (batch,), device="cuda")
    lengths[0] = cache_len
    out = decode_attention(query[:, :, 0], key, value, lengths, dim**-0.5)
    group = heads // kv_heads
    for b in range(batch):
        n = int(lengths[b])
        ref = torch.nn.functional.scaled_dot_product_attention(
            query[b : b + 1].double(), key[b : b + 1, :, :n].double().repeat_interleave(group, 1),
            value[b : b + 1, :, :n].double().repeat_interleave(group, 1), scale=dim**-0.5,
        )[0, :, 0]
        same_precision = torch.nn.functional.scaled_dot_product_attention(
            query[b : b + 1], key[b : b + 1, :, :n].repeat_interleave(group, 1),
            value[b : b + 1, :, :n].repeat_interleave(group, 1), scale=dim**-0.5,
        )[0, :, 0]
        bound = max(2 * _rel(same_precision, ref), 1e-3)
        assert _rel(out[b, 0], ref) < bound, f"row {b} (length {n})"


def test_greedy_matches_transformers_generate_fp32():
    model = _model(torch.float32, seed=1)
    ids = _prompt(2, 13, seed=3)
    out = FastGenerator(model).generate(ids, 32)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(out.sequences, ref)


def test_sampling_on_the_graph_path_is_seeded():
    model = _model(torch.float16, seed=2)
    ids = _prompt(1, 5, seed=4)
    gen = FastGenerator(model)
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11)
    first = gen.generate(ids, 20, params).new_tokens
    assert torch.equal(gen.generate(ids, 20, params).new_tokens, first)
    assert False in gen._state.graphs  # the sampled path replays its own graph


def test_timings_and_repeat_calls_are_consistent():
    model = _model(torch.float16, seed=3)
    ids = _prompt(1, 16, seed=5)
    gen = FastGenerator(model)
    a = gen.generate(ids, 40, timings=True)
    b = gen.generate(ids, 40, timings=True)
    assert torch.equal(a.sequences, b.sequences)
    assert a.setup_s > 0 and b.setup_s == 0
    assert len(b.step_s) == 39 and all(t > 0 for t in b.step_s)


@pytest.mark.parametrize("decode_attention", [None, False])
@pytest.mark.parametrize("new_tokens", [20, 60])
def test_sliding_window_model_matches_generate(new_tokens, decode_attention):
    """Inside and past the window. With the decode attention (default) the step is replayed over a full-length
    cache; without it, transformers' rolling sliding-window cache keeps Python-side state, so decoding is eager."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, sliding_window=48, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"], eos_token_id=None, bos_token_id=None, pad_token_id=0,
    )
    model = build_random_quantized_model(config, "m2v8g128", device="cuda", dtype=torch.float32, seed=5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = _prompt(1, 10, seed=6)
    gen = FastGenerator(model, decode_attention=decode_attention)
    out = gen.generate(ids, new_tokens)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(out.sequences, ref)
    assert bool(gen._state.graphs) == gen.decode_attention


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,vocab", [(1, 128256), (4, 262144), (16, 151936)])
def test_greedy_tokens_is_argmax_on_gpu(dtype, batch, vocab):
    """The CUDA reductions behind the two-stage argmax pick the first of equal maxima too."""
    from codegemm.generation import greedy_tokens

    gen = torch.Generator().manual_seed(vocab + batch)
    logits = torch.randint(-200, 3, (batch, vocab), generator=gen).to(dtype).cuda()
    logits[0] = torch.randn(vocab, generator=gen).to(dtype).cuda()
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
