"""Quantizing one ``nn.Linear``: checks, ``XᵀX`` accumulation, and the public ``quantize_linear``."""

from __future__ import annotations

import logging
import zlib
from typing import Any

import torch
from torch import nn

from codegemm.config import CodebookConfig, as_config
from codegemm.errors import ConfigError, DTypeError, RangeError
from codegemm.nn import CodeGEMMLinear
from codegemm.quant.aq import LayerResult, quantize_weight
from codegemm.quant.options import QuantOptions, make_options
from codegemm.quant.rtn import rtn_quantize
from codegemm.validation import check_activations

logger = logging.getLogger(__name__)


def check_linear(linear: nn.Module, config: CodebookConfig, name: str = "linear") -> None:
    """Raise before any work unless ``linear`` is a finite ``nn.Linear`` that ``config`` divides."""
    if not isinstance(linear, nn.Linear):
        raise DTypeError(f"{name} must be an nn.Linear; got {type(linear).__name__}")
    try:
        config.check_layer(linear.out_features, linear.in_features)
    except ConfigError as err:
        raise ConfigError(f"cannot quantize {name!r} ({linear.out_features}x{linear.in_features}): {err}") from err
    weight = linear.weight
    if not weight.dtype.is_floating_point:
        raise DTypeError(f"{name}.weight must be floating point; got {weight.dtype}")
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise RangeError(f"{name}.weight must be finite; it holds {bad} NaN/Inf values")


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator that depends only on the seed and the layer's name (resume-safe)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


class HessianAccumulator:
    """Running ``XᵀX`` (float64) and token count of one layer's inputs."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, product: torch.Tensor | None = None) -> torch.Tensor:
        """Add the tokens of ``x [..., K]``; ``product`` reuses an ``XᵀX`` another layer already computed."""
        x2 = x.reshape(-1, x.shape[-1])
        if product is None:
            xf = x2.float()
            product = xf.T @ xf
        self.sum += product
        self.tokens += x2.shape[0]
        return product

    def mean(self) -> torch.Tensor:
        """``XᵀX / tokens`` in float32 (the objective's scale does not matter, its conditioning does)."""
        return (self.sum / max(1, self.tokens)).float()


def quantize_tensors(
    linear: nn.Linear,
    config: CodebookConfig,
    hessian: torch.Tensor | None,
    options: QuantOptions,
    name: str = "linear",
) -> tuple[CodeGEMMLinear, LayerResult]:
    """Quantize ``linear`` with ``hessian [K, K]`` (None: weight error); returns the new layer and its fit."""
    weight = linear.weight.detach().float()
    if options.method == "rtn":
        codes, books, scales = rtn_quantize(weight, config)
        from codegemm import reference

        error = weight - reference.dequantize(codes, books, scales, torch.float32)
        h = hessian if hessian is not None else torch.eye(weight.shape[1], device=weight.device)
        rel = float(((error @ h) * error).sum() / ((weight @ h) * weight).sum().clamp_min(1e-30))
        result = LayerResult(codes, books, scales, rel, [rel], 0.0)
    else:
        result = quantize_weight(weight, config, hessian, options, layer_generator(options.seed, name))
    dtype = linear.weight.dtype
    bias = None if linear.bias is None else linear.bias.detach()
    layer = CodeGEMMLinear.from_unpacked(
        result.codes, result.codebooks.to(dtype), result.scales.to(dtype), bias, config
    )
    return layer, result


def quantize_linear(
    linear: nn.Linear,
    config: CodebookConfig | str,
    inputs: torch.Tensor | None = None,
    options: QuantOptions | None = None,
    preset: str | None = None,
    **overrides: Any,
) -> CodeGEMMLinear:
    """Quantize one ``nn.Linear [N, K]`` to a :class:`CodeGEMMLinear` (float dtype of the linear kept).

    ``inputs`` (``[*, K]`` calibration activations) make the objective the
    output error ``‖X (W - Ŵ)ᵀ‖``; without them it is the weight error.
    ``options`` / ``preset`` / keyword overrides as in :func:`make_options`.
    The fit (relative error and its history) is in ``layer.quant_result``.
    """
    config = as_config(config)
    check_linear(linear, config)
    if options is None:
        options = make_options(preset, **overrides)
    elif overrides or preset:
        raise ConfigError("pass either options= or preset/keyword overrides, not both")
    hessian = None
    if inputs is not None:
        check_activations(inputs, linear.in_features, "inputs")
        if not bool(torch.isfinite(inputs).all()):
            raise RangeError("inputs must be finite; they hold NaN or Inf")
        acc = HessianAccumulator(linear.in_features, linear.weight.device)
        acc.add(inputs.to(linear.weight.device))
        hessian = acc.mean()
    layer, result = quantize_tensors(linear, config, hessian, options)
    layer.quant_result = result
    logger.debug("quantized %dx%d to %s: rel error %.5f", linear.out_features, linear.in_features,
                 config.name, result.rel_error)
    return layer
