"""Hugging Face checkpoints: save_pretrained / from_pretrained round trips and refusals of malformed files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from helpers import tiny_llama_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import codegemm
from codegemm import CheckpointError, CodebookConfig, CodeGEMMLinear, ConfigError
from codegemm.hf import (
    CodeGEMMHfQuantizer,
    CodeGEMMQuantizationConfig,
    attach_quantization_config,
    load_quantized,
    read_safetensors_header,
    save_quantized,
)
from codegemm.random_model import build_random_quantized_model, quantize_random
from codegemm.surgery import quantized_modules

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
VOCAB = 256


def tiny_llama(config: str, dtype: torch.dtype, seed: int = 0, **overrides):
    fields = dict(vocab_size=VOCAB, intermediate_size=256, **overrides)
    return build_random_quantized_model(tiny_llama_config(**fields), config, device="cpu", dtype=dtype, seed=seed)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


CASES = {
    "m2v8g32-fp32": dict(config="m2v8g32", dtype=torch.float32, overrides={}),
    "m1b6v4-perrow-fp16-bias-tied": dict(
        config="m1b6v4", dtype=torch.float16, overrides=dict(attention_bias=True, tie_word_embeddings=True)
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """A saved checkpoint, its source model and reference logits."""
    case = CASES[request.param]
    model = tiny_llama(case["config"], case["dtype"], **case["overrides"])
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    directory = tmp_path_factory.mktemp(request.param)
    attach_quantization_config(model)
    model.save_pretrained(str(directory))
    return dict(dir=directory, model=model, ids=ids, logits=logits(model, ids), dtype=case["dtype"])


def test_import_codegemm_registers_with_transformers():
    from transformers.quantizers import auto

    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["codegemm"] is CodeGEMMQuantizationConfig
    assert auto.AUTO_QUANTIZER_MAPPING["codegemm"] is CodeGEMMHfQuantizer
    codegemm.hf.register()  # idempotent
    assert auto.AUTO_QUANTIZER_MAPPING["codegemm"] is CodeGEMMHfQuantizer


def test_saved_files_describe_themselves(saved):
    config = json.loads((saved["dir"] / "config.json").read_text())["quantization_config"]
    expected = CodebookConfig.from_name(config["config"])
    assert config == {
        "quant_method": "codegemm",
        "format_version": 1,
        "config": expected.name,
        "num_codebooks": expected.num_codebooks,
        "nbits": expected.nbits,
        "vec_len": expected.vec_len,
        "group_size": expected.group_size,
        "modules_not_quantized": ["lm_head"],
    }
    header = read_safetensors_header(saved["dir"] / "model.safetensors")
    float_name = {torch.float32: "F32", torch.float16: "F16"}[saved["dtype"]]
    q = "model.layers.1.self_attn.q_proj"
    assert header[f"{q}.codes"][0] == "U8"
    assert header[f"{q}.codebooks"][0] == float_name and header[f"{q}.scales"][0] == float_name
    assert f"{q}.weight" not in header
    assert not list(saved["dir"].glob("*.bin")) and not list(saved["dir"].glob("*.pt"))


def test_from_pretrained_round_trip_gives_identical_logits(saved):
    loaded = load(saved["dir"], **{DTYPE_KWARG: saved["dtype"]})
    assert len(list(quantized_modules(loaded))) == 14
    assert isinstance(loaded.lm_head, torch.nn.Linear)
    original = saved["model"].state_dict()
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == original[key].dtype, key
        assert torch.equal(tensor, original[key]), key
    assert torch.equal(logits(loaded, saved["ids"]), saved["logits"])
    assert isinstance(loaded.config.quantization_config, CodeGEMMQuantizationConfig)
    assert not any(p.requires_grad for _, layer in quantized_modules(loaded) for p in layer.parameters())


@pytest.mark.parametrize("load_dtype", [torch.bfloat16, torch.float32])
def test_stored_codebooks_and_scales_keep_their_dtype_whatever_the_load_dtype(tmp_path, load_dtype):
    """Loading an fp16-table checkpoint in bf16 (codegemm generate's CUDA default) or fp32 leaves the codebooks and
    scales bit-identical fp16, what the CUDA kernels read; the dense parts and biases take the requested dtype."""
    model = tiny_llama("m2v8g32", torch.float16, attention_bias=True)
    attach_quantization_config(model)
    model.save_pretrained(str(tmp_path))
    loaded = load(tmp_path, **{DTYPE_KWARG: load_dtype})
    stored = dict(quantized_modules(model))
    for name, layer in quantized_modules(loaded):
        for leaf in ("codebooks", "scales"):
            assert getattr(layer, leaf).dtype == torch.float16, (name, leaf)
            assert torch.equal(getattr(layer, leaf), getattr(stored[name], leaf)), (name, leaf)
        assert layer.bias is None or layer.bias.dtype == load_dtype
    assert loaded.model.embed_tokens.weight.dtype == load_dtype
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(logits(loaded, ids)).all()


def test_loaded_model_saves_again_identically(saved, tmp_path):
    loaded = load(saved["dir"], **{DTYPE_KWARG: saved["dtype"]})
    loaded.save_pretrained(str(tmp_path))
    again = load(tmp_path, **{DTYPE_KWARG: saved["dtype"]})
    assert torch.equal(logits(again, saved["ids"]), saved["logits"])


def test_save_quantized_and_load_quantized(tmp_path):
    model = tiny_llama("m2v8g64", torch.float32, seed=3)
    ids = torch.randint(0, VOCAB, (1, 5))
    save_quantized(model, tmp_path)
    assert torch.equal(logits(load_quantized(tmp_path), ids), logits(model, ids))


def test_sharded_checkpoint_round_trip_and_missing_tensor_in_a_shard(tmp_path):
    model = tiny_llama("m2v8g32", torch.float32, seed=4)
    ids = torch.randint(0, VOCAB, (1, 6))
    attach_quantization_config(model)
    model.save_pretrained(str(tmp_path), max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    assert torch.equal(logits(load(tmp_path, device_map="cpu"), ids), logits(model, ids))
    key = "model.layers.1.mlp.up_proj.codebooks"
    shard = tmp_path / index[key]
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key} is missing"):
        load(tmp_path)


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """m2b6v8g32 (6-bit codes, so out-of-range codes fit in the uint8 storage), with reference logits."""
    model = tiny_llama("m2b6v8g32", torch.float32, seed=5)
    directory = tmp_path_factory.mktemp("base")
    save_quantized(model, directory)
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    return dict(dir=directory, ids=ids, logits=logits(model, ids))


def test_fresh_subprocess_load(base_checkpoint, tmp_path):
    expected = {"ids": base_checkpoint["ids"], "logits": base_checkpoint["logits"]}
    save_file(expected, str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent(
        f"""
        import sys, torch, codegemm
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(base_checkpoint["dir"])!r})
        assert isinstance(model.model.layers[0].mlp.up_proj, codegemm.CodeGEMMLinear)
        with torch.no_grad():
            out = model(expected["ids"]).logits
        sys.exit(0 if torch.equal(out, expected["logits"]) else 3)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def edited_copy(base: Path, tmp_path: Path, edit_tensors=None, edit_config=None) -> Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(base, directory)
    if edit_tensors is not None:
        path = directory / "model.safetensors"
        tensors = load_file(str(path))
        edit_tensors(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
    if edit_config is not None:
        path = directory / "config.json"
        data = json.loads(path.read_text())
        edit_config(data["quantization_config"])
        path.write_text(json.dumps(data))
    return directory


DOWN = "model.layers.1.mlp.down_proj"


def _set(key, fn):
    def edit(tensors):
        tensors[key] = fn(tensors[key])

    return edit


def _nan_at_one(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def _inf_at_one(t):
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


def _code_too_large(t):
    t = t.clone()
    t[2, 1, 1] = 64
    return t


MALFORMED = {
    "missing-scales": (lambda t: t.pop(f"{DOWN}.scales"), rf"{DOWN}\.scales is missing"),
    "missing-codes": (lambda t: t.pop(f"{DOWN}.codes"), rf"{DOWN}\.codes is missing"),
    "missing-codebooks": (lambda t: t.pop(f"{DOWN}.codebooks"), rf"{DOWN}\.codebooks is missing"),
    "codes-wrong-shape": (_set(f"{DOWN}.codes", lambda t: t[:, :-1].contiguous()), rf"{DOWN}\.codes must have shape"),
    "scales-wrong-shape": (_set(f"{DOWN}.scales", lambda t: t[:, :1].contiguous()), rf"{DOWN}\.scales must have shape"),
    "codebooks-wrong-shape": (
        _set(f"{DOWN}.codebooks", lambda t: t[:, :32].contiguous()),
        rf"{DOWN}\.codebooks must have shape",
    ),
    "codes-int16": (_set(f"{DOWN}.codes", lambda t: t.to(torch.int16)), rf"{DOWN}\.codes must have dtype U8; got I16"),
    "codes-float": (
        _set(f"{DOWN}.codes", lambda t: t.to(torch.float16)),
        rf"{DOWN}\.codes must have dtype U8; got F16",
    ),
    "scales-int": (_set(f"{DOWN}.scales", lambda t: t.to(torch.int32)), rf"{DOWN}\.scales must have dtype .*got I32"),
    "codes-out-of-range": (_set(f"{DOWN}.codes", _code_too_large), rf"{DOWN}\.codes must lie in \[0, 64\)"),
    "codebooks-nan": (_set(f"{DOWN}.codebooks", _nan_at_one), rf"{DOWN}\.codebooks must be finite"),
    "scales-inf": (_set(f"{DOWN}.scales", _inf_at_one), rf"{DOWN}\.scales must be finite"),
    "dense-weight-for-quantized-module": (
        lambda t: t.__setitem__(f"{DOWN}.weight", torch.randn(128, 256)),
        rf"{DOWN}\.weight: the checkpoint stores a dense weight",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tensors_are_refused_naming_the_tensor(case, base_checkpoint, tmp_path):
    edit, message = MALFORMED[case]
    directory = edited_copy(base_checkpoint["dir"], tmp_path, edit_tensors=edit)
    with pytest.raises(CheckpointError, match=message):
        load(directory)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda q: q.update(format_version=2), "format_version must be 1"),
        (lambda q: q.update(format_version="1"), "format_version must be 1"),
        (lambda q: q.pop("format_version"), "format_version is missing"),
        (lambda q: q.update(nbits=8), "nbits=8 contradicts config 'm2b6v8g32'"),
        (lambda q: q.update(config="m2v8g33"), "quantization_config.config"),
        (lambda q: q.update(modules_not_quantized=[]), r"lm_head\.weight: the checkpoint stores a dense weight"),
    ],
    ids=["unknown-version", "version-as-string", "missing-version", "contradicting-fields", "bad-config-name", "lm_head-not-listed"],
)
def test_malformed_quantization_config_is_refused(edit, message, base_checkpoint, tmp_path):
    directory = edited_copy(base_checkpoint["dir"], tmp_path, edit_config=edit)
    with pytest.raises(CheckpointError, match=message):
        load(directory)


def test_pickled_weights_are_never_loaded(base_checkpoint, tmp_path):
    directory = edited_copy(base_checkpoint["dir"], tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load(directory)


def test_load_quantized_refuses_a_plain_checkpoint(tmp_path):
    plain = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    plain.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="no quantization_config with quant_method 'codegemm'"):
        load_quantized(tmp_path)


# ---------------------------------------------------------------- attach


def test_attach_refuses_unquantized_and_mixed_models():
    plain = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ConfigError, match="no CodeGEMMLinear"):
        attach_quantization_config(plain)
    quantize_random(plain, "m2v8g32", skip=["mlp"], dtype=torch.float32)
    quantize_random(plain, "m1v8g32", dtype=torch.float32)
    with pytest.raises(ConfigError, match="mixes"):
        attach_quantization_config(plain)
    with pytest.raises(ConfigError, match="must be a transformers PreTrainedModel"):
        attach_quantization_config(torch.nn.Sequential(CodeGEMMLinear(16, 16, "m1v8")))


def test_attach_checks_config_and_modules_not_quantized():
    model = tiny_llama("m2v8g32", torch.float32)
    with pytest.raises(ConfigError, match="does not match"):
        attach_quantization_config(model, "m2v8g64")
    with pytest.raises(ConfigError, match="is a quantized CodeGEMMLinear"):
        attach_quantization_config(model, modules_not_quantized=["model.layers.0.mlp.up_proj"])
    quant = attach_quantization_config(model, "m2v8g32", modules_not_quantized=["extra.dense"])
    assert quant.modules_not_quantized == ["extra.dense", "lm_head"]
    assert quant.to_dict()["config"] == "m2v8g32"
