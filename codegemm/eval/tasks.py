"""lm-eval-harness tasks run in process on an already-loaded model (HFLM wrapper).

Offline use: lm-eval reads task data through the ``datasets`` package. Point a
task at local files with a task YAML in a directory passed as
``include_path`` (``--tasks-include DIR`` on the CLI), e.g. a copy of the
task's YAML whose ``dataset_path: json`` and
``dataset_kwargs: {data_files: {test: /data/arc_easy_test.jsonl}}``; set
``HF_DATASETS_OFFLINE=1`` so nothing is fetched.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from codegemm.errors import UnsupportedError

logger = logging.getLogger(__name__)


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    batch_size: int = 1,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
) -> dict[str, dict[str, Any]]:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate`` on ``model``.

    Raises :class:`UnsupportedError` when lm-eval is not installed
    (``pip install codegemm[eval]``).
    """
    try:
        import lm_eval  # type: ignore[import-not-found]
        from lm_eval.models.huggingface import HFLM  # type: ignore[import-not-found]
    except ImportError as err:
        raise UnsupportedError("--tasks needs lm-eval: pip install 'codegemm[eval]' (or lm-eval>=0.4.5)") from err
    if not tasks:
        raise UnsupportedError("tasks must name at least one lm-eval task, e.g. ['arc_easy']")
    kwargs: dict[str, Any] = {}
    if include_path:
        from lm_eval.tasks import TaskManager  # type: ignore[import-not-found]

        kwargs["task_manager"] = TaskManager(include_path=include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot, **kwargs)
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return out
