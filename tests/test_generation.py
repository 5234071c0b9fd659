"""The fast generation path on CPU: same greedy tokens as transformers' generate, sampling, errors, CLIs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama_config as shared_tiny_llama_config
from transformers import LlamaConfig

from codegemm.bench.archs import architecture_config, architecture_fields
from codegemm.bench.models import parse_backends
from codegemm.cli.main import main
from codegemm.errors import ConfigError, DTypeError, RangeError, ShapeError
from codegemm.generation import FastGenerator, SamplingParams, filter_logits, greedy_tokens, select_next
from codegemm.nn import CodeGEMMLinear
from codegemm.random_model import build_random_quantized_model

VOCAB = 384


def tiny_llama_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=512,
                  eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return shared_tiny_llama_config(**{**fields, **overrides})


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def model():
    net = build_random_quantized_model(tiny_llama_config(), "m2v8g32", device="cpu", dtype=torch.float32, seed=1)
    assert any(isinstance(m, CodeGEMMLinear) for m in net.modules())
    return _no_eos(net)


@pytest.fixture(scope="module")
def generator(model):
    return FastGenerator(model, max_batch_size=4)


def _prompt(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(model, ids: torch.Tensor, new: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, **kwargs)


@pytest.mark.parametrize("batch,prompt_len", [(1, 5), (3, 11)])
def test_greedy_matches_transformers_generate(model, generator, batch, prompt_len):
    ids = _prompt(batch, prompt_len, seed=batch)
    out = generator.generate(ids, 24, timings=True)
    assert out.sequences.shape == (batch, prompt_len + 24)
    assert torch.equal(out.sequences[:, :prompt_len], ids)
    assert torch.equal(out.sequences, _hf_greedy(model, ids, 24))
    assert len(out.step_s) == 23 and all(t > 0 for t in out.step_s)
    assert out.prefill_s > 0


def test_layers_share_one_write_position(model, generator):
    """After a request every cache layer holds one counter object equal to the tokens written (one add per step)."""
    ids = _prompt(2, 9, seed=3)
    out = generator.generate(ids, 10)
    assert torch.equal(out.sequences, _hf_greedy(model, ids, 10))
    layers = generator._state.cache.layers
    assert len({id(layer.cumulative_length) for layer in layers}) == 1
    assert int(layers[0].cumulative_length) == 9 + 10 - 1  # the last token is returned, not yet fed back


def test_generator_reuses_cache_across_calls(model, generator):
    ids = _prompt(1, 7, seed=5)
    first = generator.generate(ids, 12).sequences
    generator.generate(_prompt(1, 30, seed=6), 40)  # fills more of the cache in between
    assert torch.equal(generator.generate(ids, 12).sequences, first)


def test_stop_token_ends_generation_like_transformers(model, generator):
    ids = _prompt(1, 6, seed=7)
    free = generator.generate(ids, 16).new_tokens[0]
    stop = int(free[4])
    first = int((free == stop).nonzero()[0])
    out = generator.generate(ids, 16, stop_token_ids=[stop])
    assert out.new_tokens.shape[1] == first + 1 and int(out.new_tokens[0, -1]) == stop
    hf = _hf_greedy(model, ids, 16, eos_token_id=stop)
    assert torch.equal(out.sequences, hf)


def test_stop_token_pads_finished_rows(generator):
    ids = _prompt(2, 6, seed=8)
    free = generator.generate(ids, 10).new_tokens
    stop = int(free[0, 2])
    out = generator.generate(ids, 10, stop_token_ids=[stop], pad_token_id=0)
    row = out.new_tokens[0]
    hit = int((row == stop).nonzero()[0])
    assert torch.all(row[hit + 1 :] == 0)


def test_streamer_gets_prompt_then_every_token(generator):
    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(-1).clone())

        def end(self):
            self.ended = True

    ids = _prompt(1, 4, seed=9)
    streamer = Collect()
    out = generator.generate(ids, 9, streamer=streamer)
    assert streamer.ended
    assert torch.equal(streamer.puts[0], ids[0])
    assert torch.equal(torch.cat(streamer.puts[1:]), out.new_tokens[0])


def test_sampling_is_seeded_and_top_k_one_is_greedy(generator):
    ids = _prompt(2, 5, seed=10)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=123)
    a = generator.generate(ids, 12, params).new_tokens
    b = generator.generate(ids, 12, params).new_tokens
    c = generator.generate(ids, 12, SamplingParams(temperature=1.0, seed=124)).new_tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = generator.generate(ids, 12).new_tokens
    assert torch.equal(generator.generate(ids, 12, SamplingParams(temperature=0.7, top_k=1, seed=1)).new_tokens, greedy)


def test_sampled_tokens_stay_inside_top_k(generator):
    ids = _prompt(1, 5, seed=11)
    out = generator.generate(ids, 10, SamplingParams(temperature=2.0, top_k=3, seed=5), keep_logits=True)
    top3 = out.logits[0].topk(3, dim=-1).indices
    assert torch.all((top3 == out.new_tokens[0, :, None]).any(dim=-1))


def test_filter_logits_top_k_and_top_p():
    logits = torch.randn(3, 50)
    kept = torch.isfinite(filter_logits(logits, top_k=7, top_p=1.0)).sum(dim=-1)
    assert torch.equal(kept, torch.full((3,), 7))
    probs = logits.softmax(-1)
    out = filter_logits(logits, top_k=0, top_p=0.6)
    for row in range(3):
        sorted_p = probs[row].sort(descending=True).values
        expected = int((sorted_p.cumsum(0) - sorted_p < 0.6).sum())
        assert int(torch.isfinite(out[row]).sum()) == expected
    tiny_p = filter_logits(logits, top_k=0, top_p=1e-6)
    assert torch.equal(tiny_p.argmax(-1), logits.argmax(-1))
    assert torch.equal(torch.isfinite(tiny_p).sum(-1), torch.ones(3, dtype=torch.long))


def test_select_next_greedy_is_argmax():
    logits = torch.randn(4, 30)
    assert torch.equal(select_next(logits, SamplingParams(), None), logits.argmax(-1))


@pytest.mark.parametrize("vocab", [30, 4099, 5000, 128256, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_tokens_is_argmax_with_ties(vocab, dtype):
    """The two-stage reduction returns argmax's index, the first of equal maxima, also across slices."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-50, 8, (3, vocab), generator=gen).to(dtype)  # the maximum repeats many times
    logits[2] = torch.randn(vocab, generator=gen).to(dtype)
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert torch.equal(greedy_tokens(logits[:, None, :]), logits[:, None, :].argmax(-1))


@pytest.mark.parametrize("decode_attention", [None, True])
def test_gemma3_sliding_window_matches_generate(decode_attention):
    """A hybrid sliding-window model decoded past its window: the generic path (transformers' rolling cache and
    SDPA), and the decode attention over a full-length cache (interpreted Triton on CPU)."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=8, max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        eos_token_id=None, bos_token_id=None, pad_token_id=0,
    )
    net = _no_eos(build_random_quantized_model(config, "m2v8g32", device="cpu", dtype=torch.float32, seed=2))
    ids = _prompt(2, 5, seed=12)
    gen = FastGenerator(net, decode_attention=decode_attention)
    out = gen.generate(ids, 14)
    assert torch.equal(out.sequences, _hf_greedy(net, ids, 14))
    assert gen._state.replay_ok == bool(decode_attention)  # full-length layers keep the step replayable


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,prompt_shape,new,error,match",
    [
        ({"max_cache_len": 32}, (1, 30), 8, ConfigError, "fit the KV cache of 32"),
        ({"max_batch_size": 2}, (3, 4), 4, ConfigError, "max_batch_size=2"),
        ({}, (1, 500), 20, ConfigError, "max_position_embeddings=512"),
        ({}, (1, 4), 0, ConfigError, "max_new_tokens"),
    ],
)
def test_bad_requests_fail_before_allocation(model, kwargs, prompt_shape, new, error, match):
    gen = FastGenerator(model, **kwargs)
    with pytest.raises(error, match=match):
        gen.generate(torch.ones(prompt_shape, dtype=torch.long), new)
    assert gen._state is None  # no cache was built


def test_bad_token_ids(model):
    gen = FastGenerator(model)
    with pytest.raises(DTypeError, match="int64 or int32"):
        gen.generate(torch.ones(1, 4), 2)
    with pytest.raises(ShapeError, match="batch, prompt_len"):
        gen.generate(torch.ones(4, dtype=torch.long), 2)
    with pytest.raises(RangeError, match=f"vocab_size={VOCAB}"):
        gen.generate(torch.full((1, 4), VOCAB), 2)
    assert gen._state is None


def test_bad_generator_settings(model):
    with pytest.raises(ConfigError, match="cuda_graph=True needs a model on a CUDA device"):
        FastGenerator(model, cuda_graph=True)
    with pytest.raises(ConfigError, match="max_cache_len must be at most"):
        FastGenerator(model, max_cache_len=4096)
    with pytest.raises(ConfigError, match="streaming needs batch size 1"):
        FastGenerator(model).generate(_prompt(2, 3), 2, streamer=object())


@pytest.mark.parametrize(
    "kwargs,match",
    [({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"seed": -1}, "seed")],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**kwargs)


def test_unknown_architecture_and_backend():
    with pytest.raises(ConfigError, match="llama3-8b"):
        architecture_fields("llama3-9b")
    with pytest.raises(ConfigError, match="does not exist"):
        architecture_fields("/nonexistent/config.json")
    with pytest.raises(ConfigError, match="backends"):
        parse_backends("fp16,marlin")
    assert parse_backends("codegemm,aqlm") == ["codegemm", "aqlm-2x8", "aqlm-1x16"]


def test_architecture_configs_are_llama3():
    big = architecture_config("llama3-70b")
    assert (big.hidden_size, big.num_hidden_layers, big.num_key_value_heads, big.vocab_size) == (8192, 80, 8, 128256)
    assert architecture_config("llama3-8b", num_layers=3).num_hidden_layers == 3
    gemma = architecture_config("gemma3-270m", num_layers=2)  # per-layer attention kinds follow the depth
    assert gemma.num_hidden_layers == 2 and len(gemma.layer_types) == 2


def test_arch_from_config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", **{k: v for k, v in architecture_fields("tiny-llama").items()
                                                          if k != "model_type"}}))
    assert architecture_config(str(path)).hidden_size == 128


# --------------------------------------------------------------------------- CLIs


def test_bench_decode_cli_smoke(tmp_path):
    out = tmp_path / "decode.json"
    rc = main(["bench", "decode", "--arch", "tiny-llama", "--config", "m2v8g32", "--device", "cpu",
               "--dtype", "float32", "--backends", "fp16,codegemm", "--batch", "1", "--batch", "2",
               "--prompt", "8", "--tokens", "6", "--warmup-steps", "1", "--json", str(out)])
    assert rc == 0
    payload = json.loads(out.read_text())
    rows = {(r["backend"], r["batch"]): r for r in payload["rows"]}
    assert set(rows) == {("fp16", 1), ("fp16", 2), ("codegemm", 1), ("codegemm", 2)}
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["ttft_ms"] > 0 for r in rows.values())
    assert payload["gpu"] == "cpu" and payload["config"] == "m2v8g32"


def test_bench_decode_cli_rejects_unknown_arch(capsys):
    assert main(["bench", "decode", "--arch", "llama3-9b", "--device", "cpu"]) == 1


def test_generate_cli_streams_text_from_a_quantized_checkpoint(tmp_path, capsys):
    """`codegemm generate DIR PROMPT` on a saved CodeGEMM checkpoint: the streamed text is the greedy continuation."""
    from codegemm.hf.checkpoint import save_quantized
    from tests._tiny_models import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = tiny_llama_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    net = build_random_quantized_model(config, "m2v8g32", device="cpu", dtype=torch.float32, seed=3)
    save_quantized(net, tmp_path)
    tokenizer.save_pretrained(str(tmp_path))
    rc = main(["generate", str(tmp_path), "hello there", "--max-new-tokens", "12", "--device", "cpu",
               "--ignore-eos"])
    assert rc == 0
    captured = capsys.readouterr()
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    expected = tokenizer.decode(_hf_greedy(_no_eos(net), ids, 12)[0, ids.shape[1] :], skip_special_tokens=True)
    assert captured.out.rstrip("\n") == expected
    assert "12 tokens" in captured.err


def test_generate_cli_rejects_bad_flags(model, monkeypatch):
    from codegemm import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("must not load"))
    assert main(["generate", "x", "--temperature", "-1"]) == 1
    assert main(["generate", "dir", "prompt", "extra"]) == 1


@pytest.mark.slow
def test_generate_cli_on_embedded_gemma(capsys):
    rc = main(["generate", "The capital of France is", "--max-new-tokens", "8", "--device", "cpu"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "8 tokens" in captured.err or "tokens" in captured.err


# --------------------------------------------------------------------------- decode attention (Triton, interpreted on CPU)


def _attention_reference(q, k, v, lengths, scale):
    batch, heads, _ = q.shape
    group = heads // k.shape[1]
    rows = []
    for b in range(batch):
        n = int(lengths[b])
        keys = k[b, :, :n].double().repeat_interleave(group, 0)
        values = v[b, :, :n].double().repeat_interleave(group, 0)
        weights = ((q[b].double()[:, None, :] @ keys.transpose(-1, -2))[:, 0] * scale).softmax(-1)
        rows.append((weights[:, None, :] @ values)[:, 0])
    return torch.stack(rows)[:, None]


@pytest.mark.parametrize(
    "batch,heads,kv_heads,dim,cache_len,dtype,tol",
    [(1, 4, 2, 32, 200, torch.float32, 1e-5), (3, 8, 2, 64, 130, torch.float32, 1e-5),
     (2, 6, 6, 32, 64, torch.float32, 1e-5), (2, 8, 1, 64, 300, torch.float16, 2e-3)],
)
def test_decode_attention_matches_reference(batch, heads, kv_heads, dim, cache_len, dtype, tol):
    from codegemm.generation.attention import decode_attention

    # Non-contiguous in every dim, as a projection output viewed by transformers can be.
    query = torch.randn(dim, 1, heads, batch, dtype=dtype).permute(3, 2, 1, 0)
    key = torch.randn(batch, kv_heads, cache_len, dim, dtype=dtype)
    value = torch.randn(batch, kv_heads, cache_len, dim, dtype=dtype)
    lengths = torch.randint(1, cache_len + 1, (batch,))
    lengths[0] = cache_len
    out = decode_attention(query[:, :, 0], key, value, lengths, dim**-0.5)
    ref = _attention_reference(query[:, :, 0], key, value, lengths, dim**-0.5)
    assert out.shape == (batch, 1, heads, dim) and out.dtype == dtype
    assert float((out.double() - ref).norm() / ref.norm()) < tol


def test_decode_attention_in_a_model_matches_sdpa(model):
    """One decode step through transformers with the decode attention switched on equals the SDPA step."""
    from codegemm.generation.attention import decode_attention_enabled, supports_decode_attention
    from codegemm.generation.cache import make_static_cache

    assert supports_decode_attention(model) == ""
    ids = _prompt(2, 9, seed=13)
    steps = []
    for enabled in (False, True):
        cache = make_static_cache(model, 2, 64, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            step = {"input_ids": ids[:, -1:], "position_ids": torch.full((2, 1), 9), "past_key_values": cache,
                    "use_cache": True}
            if enabled:
                with decode_attention_enabled(model):
                    steps.append(model(**step).logits)
            else:
                steps.append(model(**step).logits)
    assert model.config._attn_implementation != "codegemm_decode"
    assert float((steps[1] - steps[0]).norm() / steps[0].norm()) < 1e-5


def test_decode_attention_accepts_sliding_windows_but_not_softcapping():
    from transformers import Gemma3TextConfig

    from codegemm.generation.attention import supports_decode_attention

    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8)
    net = build_random_quantized_model(config, "m2v8g32", device="meta", dtype=torch.float32)
    assert supports_decode_attention(net) == ""
    config.attn_logit_softcapping = 50.0
    assert "softcaps" in supports_decode_attention(net)
