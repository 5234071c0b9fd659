"""`codegemm info DIR`: config, exact bits per weight, size against fp16, per-layer table."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama_config
from transformers import AutoModelForCausalLM

from codegemm import CodebookConfig
from codegemm.cli.main import main
from codegemm.hf import save_quantized
from codegemm.random_model import build_random_quantized_model
from codegemm.surgery import quantized_modules

HF_CONFIG = dict(vocab_size=200, max_position_embeddings=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build_random_quantized_model(tiny_llama_config(**HF_CONFIG), "m2b6v8g64", dtype=torch.float16, seed=0)
    directory = tmp_path_factory.mktemp("info")
    save_quantized(model, directory)
    return directory, model


def exact_bits_per_weight(model) -> float:
    total_bits = total_weights = 0
    for _, layer in quantized_modules(model):
        c: CodebookConfig = layer.config
        n, k = layer.out_features, layer.in_features
        total_bits += n * (k // c.vec_len) * c.num_codebooks * c.nbits  # codes
        total_bits += n * (k // c.group_size) * 16  # fp16 scales
        total_bits += c.num_codebooks * 2**c.nbits * c.vec_len * 16  # fp16 codebooks
        total_weights += n * k
    return total_bits / total_weights


def test_table_output(checkpoint, capsys):
    directory, model = checkpoint
    assert main(["info", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "m2b6v8g64 (num_codebooks=2, nbits=6, vec_len=8, group_size=64); format_version 1" in out
    assert f"bits per weight:   {exact_bits_per_weight(model):.4f}" in out
    assert "for an fp16 copy" in out and "kept dense:        lm_head" in out
    assert "dense tensors:" in out and "F16" in out and "--save-dtype" not in out  # the hint is for F32 only
    rows = [line.split() for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 14
    assert rows[0][0] == "model.layers.0.mlp.down_proj" and rows[-1][0] == "model.layers.1.self_attn.v_proj"
    down = next(row for row in rows if row[0] == "model.layers.1.mlp.down_proj")
    assert down[1:4] == ["384", "128", "m2b6v8g64"]
    assert float(down[4]) == pytest.approx(CodebookConfig.from_name("m2b6v8g64").bits_per_weight(128, 384), abs=1e-4)


def test_json_output_is_exact(checkpoint, capsys):
    directory, model = checkpoint
    assert main(["info", str(directory), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"] == "m2b6v8g64" and data["nbits"] == 6 and data["group_size"] == 64
    assert data["bits_per_weight"] == pytest.approx(exact_bits_per_weight(model), rel=1e-12)
    assert data["disk_bytes"] == (directory / "model.safetensors").stat().st_size
    dense = AutoModelForCausalLM.from_config(tiny_llama_config(**HF_CONFIG))
    assert data["fp16_bytes"] == 2 * sum(p.numel() for p in dense.parameters())
    quantized = {name for name, _ in quantized_modules(model)}
    dense_params = [p for name, p in model.named_parameters() if name.rpartition(".")[0] not in quantized]
    assert data["dense_bytes"] == {"F16": 2 * sum(p.numel() for p in dense_params)}
    assert len(data["layers"]) == 14
    assert {"name", "in_features", "out_features", "config", "bits_per_weight"} == set(data["layers"][0])


def test_no_layers_flag(checkpoint, capsys):
    directory, _ = checkpoint
    assert main(["info", str(directory), "--no-layers"]) == 0
    assert "model.layers." not in capsys.readouterr().out


def test_bad_directories_fail_cleanly(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 1
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["info", str(tmp_path)]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_help_is_accurate(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("bits per weight", "fp16", "per quantized layer", "DIR", "--json", "--no-layers"):
        assert phrase in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "show a CodeGEMM checkpoint's config" in capsys.readouterr().out


def test_unknown_format_version_is_refused(checkpoint, tmp_path, caplog):
    directory, _ = checkpoint
    copy = tmp_path / "copy"
    copy.mkdir()
    data = json.loads((directory / "config.json").read_text())
    data["quantization_config"]["format_version"] = 2
    (copy / "config.json").write_text(json.dumps(data))
    (copy / "model.safetensors").symlink_to(directory / "model.safetensors")
    assert main(["info", str(copy)]) == 1
    assert "format_version must be 1" in caplog.text
