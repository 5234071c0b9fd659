"""Block-sequential quantization of a whole (tiny) Llama: report, skip list, RTN, save/load, bad input."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import byte_tokenizer, tiny_llama

from codegemm import CodeGEMMError, CodeGEMMLinear, ConfigError, RangeError
from codegemm.data import DataError
from codegemm.quant import quantize
from codegemm.quant.capture import find_blocks
from codegemm.surgery import quantized_modules

FAST = dict(max_rounds=1, adam_steps=8, kmeans_iters=5)


def _tokens(n: int = 6, t: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def test_quantize_tiny_llama_end_to_end():
    model = tiny_llama()
    probe = _tokens(2, 48, seed=9)
    with torch.no_grad():
        ref = model(probe).logits
    report = quantize(model, "m2b6v4g32", _tokens(), nsamples=6, seqlen=64, **FAST)
    names = [n for n, _ in quantized_modules(model)]
    assert len(names) == 14 and len(report.layers) == 14
    assert [r.name for r in report.layers] == names
    assert all(0 < r.rel_error < 0.5 for r in report.layers)
    assert isinstance(model.lm_head, torch.nn.Linear)
    with torch.no_grad():
        out = model(probe).logits
    assert _rel(out, ref) < 0.3  # 3 bits per weight; a random tiny net amplifies layer errors ~10x
    table = report.table()
    assert "model.layers.1.mlp.down_proj" in table and "bits/weight" in table
    assert report.bits_per_weight == pytest.approx(
        sum(r.shape[0] * r.shape[1] * report.config.bits_per_weight(*r.shape) for r in report.layers)
        / sum(r.shape[0] * r.shape[1] for r in report.layers)
    )


def test_finetuning_never_hurts_the_block_fit():
    model = tiny_llama(layers=1)
    report = quantize(model, "m1b4v4g32", _tokens(), nsamples=6, seqlen=64, finetune_epochs=2, finetune_lr=1e-3,
                      **FAST)
    (index, first_epoch, after), = report.finetune
    assert index == 0 and after < first_epoch


def test_skip_list_and_text_calibration():
    model = tiny_llama(layers=1)
    text = ["The quick brown fox jumps over the lazy dog. " * 20, "Pack my box with five dozen liquor jugs. " * 20]
    quantize(model, "m1b4v4g32", text, tokenizer=byte_tokenizer(), nsamples=4, seqlen=64,
             skip=("mlp.down_proj", "re:k_proj$"), **FAST)
    block = find_blocks(model)[1][0]
    assert isinstance(block.mlp.down_proj, torch.nn.Linear)
    assert isinstance(block.self_attn.k_proj, torch.nn.Linear)
    assert isinstance(block.self_attn.q_proj, CodeGEMMLinear)


def test_rtn_method_through_the_same_driver():
    model = tiny_llama(layers=1)
    report = quantize(model, "m1b4v1g32", _tokens(), nsamples=2, seqlen=32, method="rtn")
    assert len(report.layers) == 7 and all(r.rel_error < 0.05 for r in report.layers)


def test_saved_checkpoint_loads_with_from_pretrained_and_matches(tmp_path):
    from transformers import AutoModelForCausalLM

    from codegemm.hf import save_quantized

    model = tiny_llama(layers=1)
    quantize(model, "m2b4v4g32", _tokens(), nsamples=4, seqlen=32, **FAST)
    save_quantized(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    probe = _tokens(1, 40, seed=4)
    with torch.no_grad():
        assert torch.allclose(loaded(probe).logits, model(probe).logits, atol=1e-5, rtol=1e-5)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, CodeGEMMLinear)


def test_bad_input_fails_before_any_work():
    model = tiny_llama(layers=1, max_positions=64)
    with pytest.raises(CodeGEMMError, match="exceeds the model's max_position_embeddings=64"):
        quantize(model, "m1b4v4g32", _tokens(t=128), nsamples=2, seqlen=128)
    with pytest.raises(ConfigError, match="multiple of group_size=128"):
        quantize(model, "m2v8g128", _tokens(), nsamples=2, seqlen=32)
    with pytest.raises(DataError, match="too short"):
        quantize(model, "m1b4v4g32", ["tiny text"], tokenizer=byte_tokenizer(), nsamples=2, seqlen=32)
    with pytest.raises(DataError, match="empty"):
        quantize(model, "m1b4v4g32", ["  "], tokenizer=byte_tokenizer(), nsamples=2, seqlen=32)
    with pytest.raises(DataError, match="needs a tokenizer"):
        quantize(model, "m1b4v4g32", ["some text " * 50], nsamples=2, seqlen=32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(RangeError, match="model.layers.0.mlp.up_proj.weight must be finite"):
        quantize(model, "m1b4v4g32", _tokens(), nsamples=2, seqlen=32)
    assert not any(True for _ in quantized_modules(model))


def test_two_runs_on_two_cpu_threads_are_bit_identical():
    """The learned-codebook step sums gradients through index_put_(accumulate=True), whose multithreaded
    CPU order varied run to run; the quantizer runs it in PyTorch's deterministic mode on the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(2):
            model = tiny_llama(hidden=128, inter=256)
            quantize(model, "m2v8g32", _tokens(8, 128), nsamples=8, seqlen=128, max_rounds=1, adam_steps=20)
            runs.append({n: (m.codes, m.codebooks, m.scales) for n, m in quantized_modules(model)})
    finally:
        torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    for name, tensors in runs[0].items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, runs[1][name])), name


def test_report_table_reads_global_finetuning_plainly():
    from codegemm.config import CodebookConfig
    from codegemm.quant.driver import QuantReport
    from codegemm.quant.options import QuantOptions

    report = QuantReport(CodebookConfig.from_name("m2v8g128"), QuantOptions(), global_finetune=[(0, 0.74301)])
    assert "global fine-tuning: 1 epoch, mean KL over its steps 0.7430" in report.table()
    report.global_finetune.append((1, 0.61))
    assert "global fine-tuning: mean KL 0.7430 (epoch 0) -> 0.6100 (epoch 1)" in report.table()
