"""codegemm: fast 2-bit codebook-quantized LLMs through Psumbook matmuls.

Importing the package registers the ``codegemm`` quantization method with
Hugging Face transformers so that ``AutoModelForCausalLM.from_pretrained``
loads CodeGEMM checkpoints.
"""

from codegemm.config import FORMAT_VERSION, CodebookConfig
from codegemm.errors import (
    CheckpointError,
    CodeGEMMError,
    ConfigError,
    DTypeError,
    RangeError,
    ShapeError,
    UnsupportedError,
)
from codegemm.nn import CodeGEMMLinear
from codegemm.ops import Backend
from codegemm import hf  # noqa: F401  registers quant_method "codegemm" with transformers
from codegemm.quant import QuantOptions, QuantReport, quantize, quantize_linear

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "Backend",
    "CheckpointError",
    "CodeGEMMError",
    "CodeGEMMLinear",
    "CodebookConfig",
    "ConfigError",
    "DTypeError",
    "QuantOptions",
    "QuantReport",
    "RangeError",
    "ShapeError",
    "UnsupportedError",
    "quantize",
    "quantize_linear",
]
