"""Global (end-to-end) fine-tuning and block fine-tuning towards the unquantized trajectory, on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_models import tiny_llama
from torch import nn

from codegemm import CodeGEMMLinear, ConfigError
from codegemm.quant import QuantOptions, quantize
from codegemm.quant.capture import find_blocks
from codegemm.quant.driver import cast_quantized
from codegemm.quant.global_finetune import (
    global_finetune,
    global_parameters,
    mean_kl,
    record_teacher,
    split_model,
)
from codegemm.surgery import quantized_modules

FAST = dict(max_rounds=1, adam_steps=4, kmeans_iters=3, finetune_epochs=1, finetune_lr=1e-3)
CONFIG = "m1b4v4g32"


def _tokens(n: int = 4, t: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _quantized(**options) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A quantized tiny Llama, its calibration tokens and the unquantized model's final hidden states."""
    model = tiny_llama(layers=2)
    tokens = _tokens()
    teacher = record_teacher(model, tokens)
    quantize(model, CONFIG, tokens, nsamples=tokens.shape[0], seqlen=tokens.shape[1], **FAST, **options)
    return model, tokens, teacher


@pytest.fixture(scope="module")
def base() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return _quantized()


def _copy(base):
    return copy.deepcopy(base[0]), base[1], base[2]


def test_global_finetuning_lowers_the_kl_to_the_original_and_leaves_codes_alone(base):
    plain, tokens, teacher = base
    tuned, _, _ = _quantized(global_epochs=3, global_lr=1e-3)
    before, after = mean_kl(plain, tokens, teacher), mean_kl(tuned, tokens, teacher)
    assert 0 < after < 0.9 * before
    for (name, a), (_, b) in zip(quantized_modules(plain), quantized_modules(tuned)):
        assert torch.equal(a.codes, b.codes), name
        assert not torch.equal(a.codebooks, b.codebooks), name
    assert torch.equal(plain.model.embed_tokens.weight, tuned.model.embed_tokens.weight)
    assert torch.equal(plain.lm_head.weight, tuned.lm_head.weight)
    assert not torch.equal(plain.model.norm.weight, tuned.model.norm.weight)


def test_global_parameters_are_codebooks_scales_and_norms_only(base):
    model = base[0]
    params = {id(p) for p in global_parameters(model, find_blocks(model)[1])}
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, CodeGEMMLinear)
    assert id(layer.codebooks) in params and id(layer.scales) in params
    assert id(model.model.layers[1].input_layernorm.weight) in params and id(model.model.norm.weight) in params
    assert id(model.model.embed_tokens.weight) not in params and id(model.lm_head.weight) not in params
    assert all(p.dtype.is_floating_point for p in global_parameters(model, find_blocks(model)[1]))


def test_epochs_resumed_from_a_saved_record_are_bit_identical(base):
    straight, tokens, teacher = _copy(base)
    resumed = _copy(base)[0]
    blocks = find_blocks(straight)[1]
    args = dict(epochs=3, lr=1e-3, batch=2, seed=5)
    losses = global_finetune(straight, blocks, tokens, teacher, **args)

    records = {}
    global_finetune(resumed, find_blocks(resumed)[1], tokens, teacher, **{**args, "epochs": 1},
                    on_epoch=lambda epoch, loss, tensors: records.update({epoch: {k: v.clone() for k, v in tensors.items()}}))
    fresh = _copy(base)[0]  # a new process would start from the pre-tuning model and the record
    tail = global_finetune(fresh, find_blocks(fresh)[1], tokens, teacher, **args, start_epoch=1,
                           resume_tensors=records[0])
    assert tail == losses[1:]
    for (name, a), (_, b) in zip(straight.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def test_block_finetuning_towards_the_unquantized_trajectory_is_deterministic_and_fits(base):
    runs = [_quantized(finetune_teacher=1.0) for _ in range(2)]
    plain, tokens, teacher = base
    for (name, a), (_, b) in zip(runs[0][0].named_parameters(), runs[1][0].named_parameters()):
        assert torch.equal(a, b), name
    # Both targets help; the trajectory target must not be far worse than the block target.
    assert mean_kl(runs[0][0], tokens, teacher) < 1.5 * mean_kl(plain, tokens, teacher)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("global_epochs", -1, "global_epochs must be an int >= 0"),
        ("global_batch", 0, "global_batch must be an int >= 1"),
        ("global_lr", float("nan"), "global_lr must be a number >= 0"),
        ("finetune_teacher", 1.5, r"finetune_teacher must be a number in \[0, 1\]"),
    ],
)
def test_bad_options_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        QuantOptions(**{field: value})


def test_a_model_without_a_separate_head_is_refused_before_any_work():
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(64, 64))])

    with pytest.raises(ConfigError, match="global fine-tuning needs a causal LM"):
        split_model(Bare())
    model = Bare()
    with pytest.raises(ConfigError, match="global fine-tuning needs a causal LM"):
        quantize(model, CONFIG, _tokens(), nsamples=2, seqlen=48, global_epochs=1)
    assert isinstance(model.layers[0][0], nn.Linear)


def test_cast_quantized_stores_codebooks_and_scales_in_fp16_and_keeps_the_output(base):
    model, tokens, _ = _copy(base)
    with torch.no_grad():
        ref = model(tokens[:1]).logits
    assert cast_quantized(model, torch.float16) == 14
    layer = model.model.layers[1].mlp.down_proj
    assert layer.codebooks.dtype == torch.float16 and layer.scales.dtype == torch.float16
    assert model.model.norm.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(tokens[:1]).logits
    assert out.dtype == torch.float32
    # fp16 rounding of codebooks and scales (relative 2**-11) moves the logits by far less than quantization did.
    assert float((out - ref).abs().max()) < 1e-2 * float(ref.abs().max())
