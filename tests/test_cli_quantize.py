"""`codegemm quantize` / `codegemm eval` end to end on a tiny Llama directory, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tiny_models import save_tiny

from codegemm.cli.main import main
from codegemm.quant.state import PARTIAL_DIR

REPO = Path(__file__).resolve().parents[1]
FAST = {"--config": "m1b4v4g32", "--nsamples": "4", "--seqlen": "64", "--max-rounds": "1", "--ppl-seqlen": "64",
        "--max-chunks": "2"}
FAST_FLAGS = [x for kv in FAST.items() for x in kv]


def _flags_without(args: list[str]) -> list[str]:
    """FAST_FLAGS minus the options that ``args`` sets itself."""
    return [x for k, v in FAST.items() if k not in args for x in (k, v)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", layers=4, max_positions=256)


def _cli(log: Path, *args: str) -> subprocess.Popen:
    """``codegemm`` in a subprocess, output to the file ``log`` (a pipe nobody reads could fill and stall it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "codegemm.cli.main", *args], cwd=REPO, env=env,
                                stdout=handle, stderr=subprocess.STDOUT, text=True)


def test_quantize_writes_a_complete_checkpoint_and_eval_reads_it(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", tiny_dir, "--out", str(out), *FAST_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "perplexity before:" in printed and "after:" in printed and "bits/weight" in printed
    names = sorted(p.name for p in out.iterdir())
    for expected in ("README.md", "config.json", "generation_config.json", "model.safetensors", "quant_report.json",
                     "tokenizer.json"):
        assert expected in names
    assert not (out / PARTIAL_DIR).exists() and not any(n.endswith(".tmp") for n in names)
    card = (out / "README.md").read_text()
    assert tiny_dir in card and "m1b4v4g32" in card and "perplexity" in card.lower()
    report = json.loads((out / "quant_report.json").read_text())
    assert len(report["layers"]) == 28 and report["perplexity"]["after"]["perplexity"] > 1
    from transformers import AutoModelForCausalLM

    from codegemm import CodeGEMMLinear

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert isinstance(model.model.layers[3].mlp.down_proj, CodeGEMMLinear)
    assert main(["eval", str(out), "--seqlen", "64", "--max-chunks", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"]["perplexity"] == pytest.approx(report["perplexity"]["after"]["perplexity"], rel=1e-4)


def test_save_dtype_stores_dense_parts_in_bf16_and_eval_reproduces_the_printed_perplexity(tiny_dir, tmp_path, capsys):
    from codegemm.hf.checkpoint import read_safetensors_header

    out = tmp_path / "q"
    assert main(["quantize", tiny_dir, "--out", str(out), "--save-dtype", "bfloat16", *FAST_FLAGS]) == 0
    capsys.readouterr()
    stored = read_safetensors_header(out / "model.safetensors")
    assert stored["model.embed_tokens.weight"][0] == "BF16" and stored["lm_head.weight"][0] == "BF16"
    assert stored["model.norm.weight"][0] == "BF16"
    assert stored["model.layers.0.mlp.down_proj.codebooks"][0] == "F16"  # --quant-dtype, untouched
    assert stored["model.layers.0.mlp.down_proj.scales"][0] == "F16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    report = json.loads((out / "quant_report.json").read_text())
    assert main(["eval", str(out), "--dtype", "bfloat16", "--seqlen", "64", "--max-chunks", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"]["perplexity"] == pytest.approx(report["perplexity"]["after"]["perplexity"], rel=1e-4)


def test_refuses_a_non_empty_out_without_resume(tiny_dir, tmp_path, caplog):
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["quantize", tiny_dir, "--out", str(tmp_path), *FAST_FLAGS]) == 1
    assert "is not empty; pass --resume" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert main(["quantize", tiny_dir, "--out", str(tmp_path), "--resume", *FAST_FLAGS]) == 1
    assert "holds no codegemm run" in caplog.text


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/model"], "not found"),
        (["{tiny}", "--seqlen", "512"], "--seqlen=512 exceeds the model's max_position_embeddings=256"),
        (["{tiny}", "--data", "{empty}"], "data text is empty"),
        (["{tiny}", "--data", "{short}"], "calibration data is too short"),
        (["{tiny}", "--config", "m2v8g128"], "multiple of group_size=128"),
        (["{tiny}", "--method", "rtn"], "m1b<bits>v1g<group>"),
    ],
)
def test_bad_input_fails_fast_with_one_clear_error(tiny_dir, tmp_path, caplog, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("too short")
    args = [a.format(tiny=tiny_dir, empty=tmp_path / "empty.txt", short=tmp_path / "short.txt") for a in args]
    flags = _flags_without(args)
    start = time.perf_counter()
    assert main(["quantize", *args, "--out", str(tmp_path / "out"), *flags]) == 1
    assert message in caplog.text
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "out" / "config.json").exists()


def test_tokenizer_less_model_is_refused(tmp_path, caplog):
    bare = save_tiny(tmp_path / "bare", with_tokenizer=False, layers=1)
    assert main(["quantize", bare, "--out", str(tmp_path / "out"), *FAST_FLAGS]) == 1
    assert "has no usable tokenizer" in caplog.text


def test_nan_weights_are_refused_before_work(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    model_dir = Path(save_tiny(tmp_path / "nan", layers=1))
    tensors = load_file(str(model_dir / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("mlp.up_proj.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "out"), *FAST_FLAGS]) == 1
    assert "mlp.up_proj.weight must be finite" in caplog.text


def _kill_when(proc: subprocess.Popen, state: Path, key: str, at_least: int) -> int:
    """SIGKILL ``proc`` once ``state.json``'s ``key`` reaches ``at_least``; returns the value it was killed at."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text()).get(key, 0) >= at_least:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return json.loads(state.read_text())[key]


def test_sigkill_then_resume_gives_the_same_checkpoint_bit_for_bit(tiny_dir, tmp_path):
    """Killed once among the blocks and once during global fine-tuning, resumed twice: same bytes."""
    flags = [*FAST_FLAGS, "--ppl", "none", "--seed", "7", "--global-epochs", "6", "--global-lr", "1e-3"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    logs = [tmp_path / f"run{i}.log" for i in range(4)]
    proc = _cli(logs[0], "quantize", tiny_dir, "--out", str(whole), *flags)
    assert proc.wait(timeout=600) == 0, logs[0].read_text()

    state = broken / PARTIAL_DIR / "state.json"
    completed = _kill_when(_cli(logs[1], "quantize", tiny_dir, "--out", str(broken), *flags), state, "completed", 1)
    assert 1 <= completed < 4 and not (broken / "config.json").exists()
    epochs = _kill_when(_cli(logs[2], "quantize", tiny_dir, "--out", str(broken), "--resume", *flags), state,
                        "global_epochs", 2)
    assert 2 <= epochs < 6 and not (broken / "config.json").exists()
    assert f"resuming after {completed} of 4 finished blocks" in logs[2].read_text()

    proc = _cli(logs[3], "quantize", tiny_dir, "--out", str(broken), "--resume", *flags)
    assert proc.wait(timeout=600) == 0, logs[3].read_text()
    log = logs[3].read_text()
    assert f"resuming global fine-tuning after {epochs} of 6 epochs" in log
    for name in ("model.safetensors", "config.json"):
        assert (whole / name).read_bytes() == (broken / name).read_bytes(), name
    a = json.loads((whole / "quant_report.json").read_text())
    b = json.loads((broken / "quant_report.json").read_text())
    assert [r["rel_error"] for r in a["layers"]] == [r["rel_error"] for r in b["layers"]]
    assert a["global_finetune"] == b["global_finetune"] and len(a["global_finetune"]) == 6
