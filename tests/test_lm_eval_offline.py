"""lm-eval tasks in process, offline, from a task YAML that reads a local JSONL file (skipped without lm-eval)."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import byte_tokenizer, tiny_llama

from codegemm.random_model import quantize_random

lm_eval = pytest.importorskip("lm_eval")

TASK_YAML = """task: local_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_local_multiple_choice_task_runs_on_a_quantized_model(tmp_path, monkeypatch):
    from codegemm.eval import run_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "sums.jsonl"
    with data.open("w") as f:
        for a in range(1, 9):
            f.write(json.dumps({"question": f"What is {a} plus 2?", "choices": [str(a + 2), str(a + 3), str(a * 5)],
                                "label": 0}) + "\n")
    (tmp_path / "local_sums.yaml").write_text(TASK_YAML.format(data=data))
    model = tiny_llama().eval()
    quantize_random(model, "m2v8g16", seed=0, dtype=torch.float32)
    scores = run_tasks(model, byte_tokenizer(), ["local_sums"], include_path=str(tmp_path))
    assert set(scores) == {"local_sums"}
    assert 0.0 <= scores["local_sums"]["acc,none"] <= 1.0
