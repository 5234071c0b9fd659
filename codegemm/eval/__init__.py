"""Quality measurements: perplexity (the papers' protocol) and lm-eval tasks."""

from codegemm.eval.perplexity import PerplexityResult, perplexity
from codegemm.eval.tasks import run_tasks

__all__ = ["PerplexityResult", "perplexity", "run_tasks"]
