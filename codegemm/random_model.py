"""Random quantized models: throughput measurements without a quantization run.

Kernel speed does not depend on what the codes say, so the paper (and our
benchmarks) time models whose linears hold uniform random codes with
codebooks and scales scaled so that the dequantized weight has the spread of a
real initialization (std about ``initializer_range``, 0.02 for Llama).

:func:`build_random_quantized_model` builds a whole causal LM from its
Hugging Face config without ever allocating a dense weight for a quantized
layer, so a Llama-3-70B-sized model fits wherever its 2-bit codes fit (and
builds instantly on ``device="meta"``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator

import torch
from torch import nn

from codegemm.config import CodebookConfig, as_config
from codegemm.errors import ConfigError, DTypeError
from codegemm.nn import CodeGEMMLinear
from codegemm.surgery import SkipList, iter_linears, make_shell, set_module

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT_STD = 0.02
"""Std of the dequantized weight when the model config names no ``initializer_range``."""

_SCALE_LO, _SCALE_HI = 0.5, 1.5
"""Scales are ``weight_std * U(lo, hi) / rms(U(lo, hi))``: positive, varied, right RMS."""


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DTypeError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32; got {dtype}")


def _make_generator(device: torch.device, seed: int) -> torch.Generator | None:
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


def fill_random_(
    layer: CodeGEMMLinear,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype,
    weight_std: float = DEFAULT_WEIGHT_STD,
) -> CodeGEMMLinear:
    """Give ``layer`` fresh random tensors on ``device`` (replacing its placeholders).

    ``codes`` are uniform in ``[0, 2**nbits)``; ``codebooks`` are
    ``N(0, 1/m)`` so a sum of ``m`` centroids has unit variance; ``scales`` are
    positive with RMS ``weight_std``; a bias is ``N(0, weight_std)``. The
    dequantized weight therefore has std close to ``weight_std``. On ``meta``
    only shapes are set.
    """
    device = torch.device(device)
    config = layer.config
    n, k = layer.out_features, layer.in_features
    m, size, v = config.num_codebooks, config.codebook_size, config.vec_len
    groups = config.num_groups(k)
    if device.type == "meta":
        layer.codes = torch.empty((n, k // v, m), dtype=config.code_dtype, device=device)
        codebooks = torch.empty((m, size, v), dtype=dtype, device=device)
        scales = torch.empty((n, groups), dtype=dtype, device=device)
        bias = None if layer.bias is None else torch.empty((n,), dtype=dtype, device=device)
    else:
        layer.codes = torch.randint(
            0, size, (n, k // v, m), dtype=config.code_dtype, device=device, generator=generator
        )
        codebooks = torch.randn((m, size, v), device=device, generator=generator) / math.sqrt(m)
        uniform_rms = math.sqrt((_SCALE_HI**3 - _SCALE_LO**3) / (3 * (_SCALE_HI - _SCALE_LO)))
        unit = torch.rand((n, groups), device=device, generator=generator) * (_SCALE_HI - _SCALE_LO) + _SCALE_LO
        scales = unit * (weight_std / uniform_rms)
        bias = None
        if layer.bias is not None:
            bias = torch.randn((n,), device=device, generator=generator) * weight_std
    layer.codebooks = nn.Parameter(codebooks.to(dtype), requires_grad=False)
    layer.scales = nn.Parameter(scales.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return layer


def random_layer_tensors(
    config: CodebookConfig | str,
    out_features: int,
    in_features: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float16,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, codebooks, scales)`` of one random layer in the stored layout, for kernel benchmarks."""
    shell = CodeGEMMLinear(in_features, out_features, as_config(config), device="meta")
    layer = fill_random_(shell, generator, device, dtype)
    return layer.codes, layer.codebooks.detach(), layer.scales.detach()


def quantize_random(
    model: nn.Module,
    config: CodebookConfig | str,
    skip: SkipList = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    weight_std: float = DEFAULT_WEIGHT_STD,
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (but ``lm_head`` and ``skip``) with a random :class:`CodeGEMMLinear`.

    Works on models whose linears live on ``meta``: no dense weight is read or
    allocated; each new layer gets its tensors directly on ``device`` (default:
    the old layer's device). Seeded: the same model, config, device and seed
    give the same tensors. Returns the replaced module names in model order.
    See :mod:`codegemm.surgery` for the skip-list syntax.
    """
    config = as_config(config)
    _check_dtype(dtype)
    if not (isinstance(weight_std, (int, float)) and weight_std > 0 and math.isfinite(weight_std)):
        raise ConfigError(f"weight_std must be a positive finite number; got {weight_std!r}")
    chosen = list(iter_linears(model, skip))
    shells = [(name, make_shell(linear, config, device="meta", dtype=dtype, name=name)) for name, linear in chosen]
    generators: dict[torch.device, torch.Generator | None] = {}
    for (name, shell), (_, linear) in zip(shells, chosen):
        target = torch.device(device) if device is not None else linear.weight.device
        if target not in generators:
            generators[target] = _make_generator(target, seed)
        fill_random_(shell, generators[target], target, dtype, weight_std)
        set_module(model, name, shell)
    logger.debug("replaced %d linears with random %s layers", len(shells), config.name)
    return [name for name, _ in shells]


@contextlib.contextmanager
def _matrices_on_meta() -> Iterator[None]:
    """While active, every parameter of two or more dimensions is created on ``meta``.

    Matrices (linear weights, embeddings) are what would take the memory; 1-D
    parameters (norm weights, biases) keep the values their module's
    constructor gives them (ones for Llama's RMSNorm, zeros for Gemma's
    zero-centred norm), and buffers stay real so rotary ``inv_freq`` is exact.
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.dim() >= 2 and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _materialize_dense(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> int:
    """Move every non-quantized parameter to ``device``/``dtype``, initializing those on ``meta``.

    Tied parameters stay tied (each tensor is converted once and the new
    parameter is put wherever the old one was). Parameters that already hold
    values (norm weights, biases) keep them. Meta ones get the model's own
    ``_init_weights`` (embeddings and ``lm_head`` ``N(0, initializer_range)``)
    under a forked, seeded RNG; a model without ``_init_weights`` gets
    ``N(0, 0.02)``. Returns the number of parameters initialized.
    """
    converted: dict[int, nn.Parameter] = {}
    fresh: set[int] = set()
    owners: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, CodeGEMMLinear):
            continue
        touched = False
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in converted:
                target_dtype = dtype if param.dtype.is_floating_point else param.dtype
                if param.device.type == "meta":
                    data = torch.empty(param.shape, dtype=target_dtype, device=device)
                    fresh.add(id(param))
                else:
                    data = param.detach().to(device=device, dtype=target_dtype)
                converted[id(param)] = nn.Parameter(data, requires_grad=False)
            touched = touched or id(param) in fresh
            module._parameters[name] = converted[id(param)]
        if touched:
            owners.append(module)
    if device.type == "meta":
        return len(fresh)
    init_fn = getattr(model, "_init_weights", None)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for module in owners:
            if init_fn is not None:
                init_fn(module)
            else:
                for param in module.parameters(recurse=False):
                    param.normal_(0.0, DEFAULT_WEIGHT_STD)
    return len(fresh)


def build_random_quantized_model(
    hf_config: Any,
    config: CodebookConfig | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    skip: SkipList = None,
) -> nn.Module:
    """A transformers causal LM from ``hf_config`` whose linears hold random codes.

    Stable signature (used by the decode benchmarks):

    - ``hf_config``: a ``transformers.PretrainedConfig`` (e.g. ``LlamaConfig``).
    - ``config``: the :class:`~codegemm.CodebookConfig` or its name (``"m2v8g128"``).
    - ``device``: where every tensor lives; ``"meta"`` builds shapes only
      (instant, no memory, even for 70B configs).
    - ``dtype``: float dtype of codebooks, scales, embeddings, norms and ``lm_head``.
    - ``seed``: same seed, config and device give the same model.
    - ``skip``: extra linears kept dense (``lm_head`` always is); see :mod:`codegemm.surgery`.

    The model is built with its matrices on ``meta`` (1-D parameters and
    buffers are real, so norms keep their constructor values and rotary
    ``inv_freq`` stays exact, in its own dtype); quantized layers get random
    tensors directly on ``device`` (:func:`quantize_random`, std from
    ``initializer_range``); the remaining matrices (embeddings, ``lm_head``)
    are initialized by the model's own ``_init_weights``. The
    model is returned in eval mode with gradients off, so ``forward`` takes the
    kernel path.
    """
    from transformers import AutoModelForCausalLM

    config = as_config(config)
    _check_dtype(dtype)
    device = torch.device(device)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an int; got {seed!r}")
    weight_std = float(getattr(hf_config, "initializer_range", None) or DEFAULT_WEIGHT_STD)
    with _matrices_on_meta():
        model = AutoModelForCausalLM.from_config(hf_config)
    names = quantize_random(model, config, skip, device=device, dtype=dtype, seed=seed, weight_std=weight_std)
    dense = _materialize_dense(model, device, dtype, seed + 1)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    if hasattr(model.config, "dtype"):
        model.config.dtype = dtype
    model.requires_grad_(False)
    model.eval()
    logger.info(
        "built random %s model: %d quantized linears (%s), %d dense matrices initialized, on %s in %s",
        type(model).__name__,
        len(names),
        config.name,
        dense,
        device,
        dtype,
    )
    return model
