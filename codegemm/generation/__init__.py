"""Fast text generation: static KV cache, a decode step compiled and replayed as a CUDA graph.

``FastGenerator(model).generate(input_ids, max_new_tokens, SamplingParams(...))``
works for any transformers causal LM (quantized with CodeGEMMLinear or not) on
CUDA and CPU.
"""

from codegemm.generation.loop import DEFAULT_MAX_BATCH_SIZE, FastGenerator, GenerationOutput
from codegemm.generation.sampling import SamplingParams, filter_logits, greedy_tokens, select_next

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "FastGenerator",
    "GenerationOutput",
    "SamplingParams",
    "filter_logits",
    "greedy_tokens",
    "select_next",
]
