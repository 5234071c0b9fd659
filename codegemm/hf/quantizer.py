"""The transformers ``HfQuantizer`` that loads CodeGEMM checkpoints through ``from_pretrained``.

Loading follows transformers' own sequence: the model is built on ``meta``;
``_process_model_before_weight_loading`` swaps every ``nn.Linear`` that
``modules_not_quantized`` does not name for a :class:`~codegemm.CodeGEMMLinear`
shell and checks the safetensors headers; transformers then loads the
tensors into the shells; ``_process_model_after_weight_loading`` checks the
loaded values. Written against the hooks shared by transformers 4.50+ and
5.x (the 4.x-only missing-keys hook is implemented as a second line of
defence).
"""

from __future__ import annotations

import logging
from typing import Any

from transformers.quantizers.base import HfQuantizer

from codegemm.errors import CheckpointError
from codegemm.hf.checkpoint import (
    check_checkpoint_headers,
    check_loaded_values,
    keep_stored_table_dtypes,
    read_headers,
    resolve_checkpoint_files,
)
from codegemm.hf.config import CodeGEMMQuantizationConfig
from codegemm.surgery import iter_linears, quantized_modules, replace_linears

logger = logging.getLogger(__name__)


class CodeGEMMHfQuantizer(HfQuantizer):
    """Loads pre-quantized CodeGEMM checkpoints; quantizing on load is not supported (use ``codegemm.quantize``)."""

    requires_calibration = True
    requires_parameters_quantization = False
    required_packages: list[str] = []

    def __init__(self, quantization_config: CodeGEMMQuantizationConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, CodeGEMMQuantizationConfig):
            raise CheckpointError(
                f"quantization_config must be a CodeGEMMQuantizationConfig; got {type(quantization_config).__name__}"
            )
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to check: every device has at least the reference backend."""

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        config = self.quantization_config.codebook_config
        skip = self.quantization_config.modules_not_quantized
        names = [name for name, _ in iter_linears(model, skip, default_skip=False)]
        replace_linears(model, config, names=names)
        files = resolve_checkpoint_files(model, kwargs.get("checkpoint_files"))
        if files is None:
            logger.warning(
                "could not locate the checkpoint's safetensors files; missing or mis-shaped tensors are "
                "detected only after loading"
            )
        else:
            headers = read_headers(files)
            check_checkpoint_headers(model, headers)
            keep_stored_table_dtypes(model, headers)  # fp16 tables stay fp16 whatever dtype the model loads in
        logger.debug("prepared %d CodeGEMMLinear modules (%s) for loading", len(names), config.name)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        check_loaded_values(model)
        for _, layer in quantized_modules(model):
            layer.requires_grad_(False)  # frozen, as CodeGEMMLinear is when built; the loader re-wraps parameters
        return model

    def update_missing_keys(self, model: Any, missing_keys: list[str], prefix: str) -> list[str]:
        """transformers 4.x: a quantized module's missing tensor is an error, never a fresh init."""
        quantized = [name for name, _ in quantized_modules(model)]
        for key in missing_keys:
            bare = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key
            module, _, _leaf = bare.rpartition(".")
            if module in quantized or key.rpartition(".")[0] in quantized:
                raise CheckpointError(f"tensor {key} is missing from the checkpoint (quantized module {module})")
        return missing_keys

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
