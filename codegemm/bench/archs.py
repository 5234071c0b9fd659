"""Model architectures the decode benchmark builds from code: no download, no checkpoint.

Each entry holds the fields of the architecture's Hugging Face config that set
the shapes and the cost of a decode step (layer count, widths, heads, vocabulary,
rotary settings). ``gemma3-270m`` is the embedded default model's architecture
(sliding-window layers: decoded without a captured graph); ``tiny-llama`` is a
few-MB model for CPU smoke tests.
"""

from __future__ import annotations

import json
import os
from typing import Any

from codegemm.errors import ConfigError

_LLAMA3_COMMON: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        **_LLAMA3_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "llama3-70b": {
        **_LLAMA3_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    "gemma3-270m": {
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    },
    "tiny-llama": {
        "model_type": "llama",
        "vocab_size": 512,
        "max_position_embeddings": 1024,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}


def architecture_fields(arch: str) -> dict[str, Any]:
    """Config fields of a named architecture, or of a ``config.json`` file; validated, nothing built."""
    if not isinstance(arch, str) or not arch:
        raise ConfigError(f"arch must be one of {sorted(ARCHITECTURES)} or a path to a config.json; got {arch!r}")
    if arch in ARCHITECTURES:
        return dict(ARCHITECTURES[arch])
    if arch.endswith(".json") or os.path.sep in arch:
        if not os.path.isfile(arch):
            raise ConfigError(f"arch config file {arch!r} does not exist")
        try:
            with open(arch, encoding="utf-8") as handle:
                fields = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"arch config file {arch!r} is not readable JSON: {err}") from err
        if not isinstance(fields, dict) or "model_type" not in fields:
            raise ConfigError(f"arch config file {arch!r} must be a JSON object with a 'model_type' field")
        return fields
    raise ConfigError(f"arch must be one of {sorted(ARCHITECTURES)} or a path to a config.json; got {arch!r}")


def architecture_config(arch: str, num_layers: int | None = None):
    """A transformers config for ``arch`` (see :func:`architecture_fields`); ``num_layers`` overrides the depth."""
    from transformers import AutoConfig

    fields = architecture_fields(arch)
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"num_layers must be a positive int; got {num_layers!r}")
        fields["num_hidden_layers"] = num_layers
        if "layer_types" in fields:  # per-layer attention kinds must match the depth
            kinds = fields["layer_types"]
            fields["layer_types"] = [kinds[i % len(kinds)] for i in range(num_layers)]
    model_type = fields.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"arch {arch!r}: transformers does not know model_type {model_type!r} ({err})") from err
