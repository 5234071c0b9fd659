"""Hugging Face integration: CodeGEMM checkpoints that ``from_pretrained`` loads.

Importing this package (``import codegemm`` does) registers the ``codegemm``
quantization config and quantizer with transformers through its public
``register_quantization_config`` / ``register_quantizer`` API. Then::

    codegemm.hf.attach_quantization_config(model)   # or codegemm.hf.save_quantized(model, dir)
    model.save_pretrained(dir)
    AutoModelForCausalLM.from_pretrained(dir)       # rebuilt, checked, identical outputs

The on-disk format is described in docs/FORMAT.md.
"""

from __future__ import annotations

from codegemm.errors import UnsupportedError
from codegemm.hf.checkpoint import (
    attach_quantization_config,
    check_checkpoint_headers,
    check_loaded_values,
    checkpoint_files,
    load_quantized,
    read_headers,
    read_quantization_config,
    read_safetensors_header,
    save_quantized,
)
from codegemm.hf.config import QUANT_METHOD, CodeGEMMQuantizationConfig
from codegemm.hf.quantizer import CodeGEMMHfQuantizer


def register() -> None:
    """Register the config and quantizer under ``quant_method="codegemm"``; idempotent.

    A re-import of this package (e.g. ``importlib.reload``) replaces its own
    earlier registration; a different library's ``codegemm`` entry is an error.
    """
    from transformers.quantizers import auto

    for mapping, cls, register_fn in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, CodeGEMMQuantizationConfig, auto.register_quantization_config),
        (auto.AUTO_QUANTIZER_MAPPING, CodeGEMMHfQuantizer, auto.register_quantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is cls:
            continue
        if existing is not None:
            if getattr(existing, "__module__", "").startswith("codegemm."):
                del mapping[QUANT_METHOD]
            else:
                raise UnsupportedError(
                    f"transformers already has a quantization method {QUANT_METHOD!r} registered by "
                    f"{existing.__module__}.{existing.__qualname__}; cannot register codegemm's"
                )
        register_fn(QUANT_METHOD)(cls)


register()

__all__ = [
    "QUANT_METHOD",
    "CodeGEMMHfQuantizer",
    "CodeGEMMQuantizationConfig",
    "attach_quantization_config",
    "check_checkpoint_headers",
    "check_loaded_values",
    "checkpoint_files",
    "load_quantized",
    "read_headers",
    "read_quantization_config",
    "read_safetensors_header",
    "register",
    "save_quantized",
]
