"""Checking CodeGEMM checkpoints on disk and preparing models for ``save_pretrained``.

transformers fills missing weights with fresh initial values and casts or
reshapes what it can, so the loader cannot trust it to refuse a malformed
checkpoint. Before any weight is read, :func:`check_checkpoint_headers` reads
the safetensors headers (JSON only, never tensor data, never pickles) and
checks every quantized module's tensors for presence, shape and dtype;
after loading, :func:`check_loaded_values` checks code ranges and finiteness
on the loaded tensors. Both raise :class:`~codegemm.CheckpointError` naming
the tensor and the problem.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from codegemm.config import CodebookConfig, as_config
from codegemm.errors import CheckpointError, CodeGEMMError, ConfigError
from codegemm.hf.config import QUANT_METHOD, CodeGEMMQuantizationConfig
from codegemm.surgery import quantized_modules
from codegemm.validation import check_codes, check_float, expected_shapes

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_MAX_HEADER_BYTES = 100 * 1024 * 1024
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_TORCH_TO_SAFETENSORS = {torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}

TensorInfo = tuple[str, tuple[int, ...]]
"""``(safetensors dtype string, shape)`` of one stored tensor."""


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of the tensors in one ``.safetensors`` file, from its JSON header."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} is not a safetensors file: header length {length} is implausible")
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read the safetensors header of {path}: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            tensors[key] = (str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: header entry for tensor {key!r} is malformed: {err!r}") from err
    return tensors


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file or an index of shards)."""
    directory = Path(directory)
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err!r}") from err
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{directory} holds no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}; "
        "CodeGEMM checkpoints are safetensors only (pickled .bin weights are never loaded)"
    )


def read_headers(files: Iterable[str | os.PathLike]) -> dict[str, TensorInfo]:
    """Merged headers of a checkpoint's shards."""
    merged: dict[str, TensorInfo] = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise CheckpointError(f"CodeGEMM checkpoints are safetensors only; refusing to read {path}")
        merged.update(read_safetensors_header(path))
    return merged


def _candidate_keys(model: nn.Module, name: str) -> list[str]:
    """Checkpoint keys a module may be stored under (with or without the base-model prefix)."""
    candidates = [name]
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        else:
            candidates.append(f"{prefix}.{name}")
    return candidates


def _expected_tensors(layer: Any) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    config: CodebookConfig = layer.config
    shapes = expected_shapes(config, layer.out_features, layer.in_features)
    expected = {
        "codes": ((_TORCH_TO_SAFETENSORS[config.code_dtype],), shapes["codes"]),
        "codebooks": (_FLOAT_DTYPES, shapes["codebooks"]),
        "scales": (_FLOAT_DTYPES, shapes["scales"]),
    }
    if layer.bias is not None:
        expected["bias"] = (_FLOAT_DTYPES, (layer.out_features,))
    return expected


def _stored_base(model: nn.Module, name: str, tensors: dict[str, TensorInfo]) -> str:
    """The key prefix under which quantized module ``name`` stores its tensors (``name`` itself if none is found)."""
    for base in _candidate_keys(model, name):
        if any(f"{base}.{leaf}" in tensors for leaf in ("codes", "codebooks", "scales", "weight")):
            return base
    return name


def check_checkpoint_headers(model: nn.Module, tensors: dict[str, TensorInfo]) -> None:
    """Every quantized module of ``model`` must find its tensors in ``tensors`` with the right shape and dtype.

    Also refuses a dense ``<module>.weight`` stored for a module that the
    ``quantization_config`` says is quantized (the config and the weights
    disagree).
    """
    for name, layer in quantized_modules(model):
        base = _stored_base(model, name, tensors)
        if f"{base}.weight" in tensors:
            raise CheckpointError(
                f"tensor {base}.weight: the checkpoint stores a dense weight for {name}, which "
                "quantization_config says is quantized (list it in modules_not_quantized if it is dense)"
            )
        for leaf, (dtypes, shape) in _expected_tensors(layer).items():
            key = f"{base}.{leaf}"
            if key not in tensors:
                raise CheckpointError(f"tensor {key} is missing from the checkpoint (quantized module {name})")
            dtype, stored_shape = tensors[key]
            if stored_shape != shape:
                raise CheckpointError(
                    f"tensor {key} must have shape {shape} for config {layer.config.name} "
                    f"(out_features={layer.out_features}, in_features={layer.in_features}); got {stored_shape}"
                )
            if dtype not in dtypes:
                raise CheckpointError(f"tensor {key} must have dtype {' or '.join(dtypes)}; got {dtype}")


_SAFETENSORS_TO_TORCH_FLOAT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def keep_stored_table_dtypes(model: nn.Module, tensors: dict[str, TensorInfo]) -> int:
    """Give every quantized shell's codebooks and scales the dtype they are stored in; returns the count changed.

    Why: transformers casts each loaded float tensor to the requested ``dtype`` unless the empty parameter it fills
    already has another dtype. Loading with ``dtype=torch.bfloat16`` would otherwise round the fp16 codebooks and
    scales to bf16 (three mantissa bits lost) and send every layer off the CUDA kernels, which read fp16 tables.
    Run after :func:`check_checkpoint_headers`, on shells that hold no values yet.
    """
    changed = 0
    for name, layer in quantized_modules(model):
        base = _stored_base(model, name, tensors)
        for leaf in ("codebooks", "scales"):
            stored = tensors.get(f"{base}.{leaf}")
            dtype = _SAFETENSORS_TO_TORCH_FLOAT.get(stored[0]) if stored is not None else None
            current = getattr(layer, leaf)
            if dtype is not None and current.dtype != dtype:
                setattr(layer, leaf, nn.Parameter(torch.empty_like(current, dtype=dtype), requires_grad=False))
                changed += 1
    return changed


def check_loaded_values(model: nn.Module) -> None:
    """Codes in ``[0, 2**nbits)`` and finite codebooks, scales and bias in every loaded quantized module."""
    for name, layer in quantized_modules(model):
        codes, scales = layer.row_tables()
        tensors = {"codes": codes, "codebooks": layer.codebooks, "scales": scales}
        if layer.bias is not None:
            tensors["bias"] = layer.bias
        for leaf, tensor in tensors.items():
            key = f"{name}.{leaf}"
            if tensor.device.type == "meta":
                raise CheckpointError(f"tensor {key} was not loaded from the checkpoint (still on meta)")
            try:
                if leaf == "codes":
                    if tensor.dtype != layer.config.code_dtype:
                        raise CheckpointError(f"must have dtype {layer.config.code_dtype}; got {tensor.dtype}")
                    check_codes(key, tensor, layer.config)
                else:
                    check_float(key, tensor)
            except CodeGEMMError as err:
                message = str(err)
                message = f"tensor {message}" if message.startswith(key) else f"tensor {key} {message}"
                raise CheckpointError(message) from err


def resolve_checkpoint_files(model: nn.Module, given: Iterable[str] | None) -> list[str] | None:
    """The checkpoint's weight files: the list transformers passes (5.x), else found from the model's name or path.

    A local directory without safetensors files is refused (pickled weights
    are never loaded). Returns ``None`` when a hub checkpoint's files are not
    in the local cache (then only the after-load checks run).
    """
    if given:
        return [str(path) for path in given]
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not source:
        return None
    if os.path.isdir(source):
        return [str(p) for p in checkpoint_files(source)]
    try:
        from transformers.utils import cached_file

        for filename in (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME):
            found = cached_file(
                source, filename, local_files_only=True, _raise_exceptions_for_missing_entries=False
            )
            if found:
                return [str(p) for p in checkpoint_files(os.path.dirname(found))]
    except (OSError, ValueError, CheckpointError) as err:
        logger.debug("could not locate the cached checkpoint files of %s: %s", source, err)
    return None


def dense_linear_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that are not quantized."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def model_codebook_config(model: nn.Module) -> CodebookConfig:
    """The single config shared by every quantized module of ``model``."""
    configs = {layer.config for _, layer in quantized_modules(model)}
    if not configs:
        raise ConfigError("model has no CodeGEMMLinear modules; quantize it before saving it as a CodeGEMM checkpoint")
    if len(configs) > 1:
        names = sorted(c.name for c in configs)
        raise ConfigError(f"format_version 1 stores one config per model; the model mixes {names}")
    return configs.pop()


def attach_quantization_config(
    model: nn.Module,
    config: CodebookConfig | str | None = None,
    modules_not_quantized: Iterable[str] | None = None,
) -> CodeGEMMQuantizationConfig:
    """Make ``model.save_pretrained(dir)`` write a CodeGEMM checkpoint.

    Sets ``model.config.quantization_config`` and the transformers quantizer
    hooks. ``config`` defaults to the one the model's quantized modules share
    (it must match them). ``modules_not_quantized`` is always the model's
    remaining dense ``nn.Linear`` names; names given here are added and must
    not be quantized modules.
    """
    from codegemm.hf.quantizer import CodeGEMMHfQuantizer

    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise ConfigError(f"model must be a transformers PreTrainedModel; got {type(model).__name__}")
    shared = model_codebook_config(model)
    if config is not None and as_config(config) != shared:
        raise ConfigError(
            f"config {as_config(config).name} does not match the model's quantized modules ({shared.name})"
        )
    dense = dense_linear_names(model)
    quantized = {name for name, _ in quantized_modules(model)}
    extra = [] if modules_not_quantized is None else list(modules_not_quantized)
    for name in extra:
        if not isinstance(name, str):
            raise ConfigError(f"modules_not_quantized must hold module names; got {name!r}")
        if name in quantized:
            raise ConfigError(f"modules_not_quantized names {name!r}, which is a quantized CodeGEMMLinear")
    names = sorted(set(dense) | set(extra))
    quant_config = CodeGEMMQuantizationConfig(config=shared, modules_not_quantized=names)
    model.config.quantization_config = quant_config
    model.hf_quantizer = CodeGEMMHfQuantizer(quant_config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return quant_config


def save_quantized(model: nn.Module, directory: str | os.PathLike, **save_kwargs: Any) -> Path:
    """Attach the quantization config and ``save_pretrained`` to ``directory`` (safetensors)."""
    attach_quantization_config(model)
    model.save_pretrained(str(directory), **save_kwargs)
    return Path(directory)


def read_quantization_config(directory: str | os.PathLike) -> CodeGEMMQuantizationConfig:
    """The ``quantization_config`` of a checkpoint directory's ``config.json``, validated."""
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    block = data.get("quantization_config") if isinstance(data, dict) else None
    if not isinstance(block, dict) or block.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} has no quantization_config with quant_method {QUANT_METHOD!r}")
    return CodeGEMMQuantizationConfig.from_dict(block)


def load_quantized(directory: str | os.PathLike, **from_pretrained_kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(directory)`` after checking it is a CodeGEMM checkpoint."""
    from transformers import AutoModelForCausalLM

    read_quantization_config(directory)
    return AutoModelForCausalLM.from_pretrained(str(directory), **from_pretrained_kwargs)
