"""Random-weight models for the decode benchmark, one per backend, built without a download.

* ``fp16``: every matrix dense in the model dtype.
* ``codegemm``: :func:`codegemm.random_model.build_random_quantized_model`.
* ``aqlm-2x8`` / ``aqlm-1x16``: the ``aqlm`` package's ``QuantizedLinear``
  (per-row scales, 8-wide vectors), holding random codes. They are built as
  CodeGEMM layers of the same format (``m2v8`` / ``m1b16v8``: AQLM stores the
  same ``[N, K/8, m]`` codes and ``[m, 2**b, 8]`` codebooks) and handed over
  tensor by tensor, so no dense weight ever exists.

``lm_head`` and embeddings stay dense in every backend, as in AQLM's released models.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from codegemm.config import CodebookConfig
from codegemm.errors import ConfigError, UnsupportedError
from codegemm.random_model import build_random_quantized_model
from codegemm.surgery import quantized_modules, set_module

logger = logging.getLogger(__name__)

FP16 = "fp16"
CODEGEMM = "codegemm"
CODEGEMM_SEPARATE = "codegemm-separate"
"""The codegemm model with its q/k/v and gate/up launched one layer at a time (the A/B of siblings grouping)."""
CODEGEMM_ROWS = "codegemm-rows"
"""The codegemm model with its tables left row-major on the GPU (the A/B of the tiled layout, codegemm.tiling)."""
AQLM_FORMATS: dict[str, CodebookConfig] = {
    "aqlm-2x8": CodebookConfig(num_codebooks=2, nbits=8, vec_len=8, group_size=None),
    "aqlm-1x16": CodebookConfig(num_codebooks=1, nbits=16, vec_len=8, group_size=None),
}
BACKENDS = (FP16, CODEGEMM, CODEGEMM_SEPARATE, CODEGEMM_ROWS, *AQLM_FORMATS)
ALIASES = {"aqlm": tuple(AQLM_FORMATS)}

_ALL_LINEARS = "re:."
"""A skip entry matching every linear: the dense model."""


def parse_backends(text: str) -> list[str]:
    """``"fp16,codegemm,aqlm"`` -> backend names in order, ``aqlm`` expanded; unknown names are an error."""
    names: list[str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        expanded = ALIASES.get(part, (part,))
        for name in expanded:
            if name not in BACKENDS:
                raise ConfigError(f"backends must be a comma-separated subset of {[*BACKENDS, *ALIASES]}; got {part!r}")
            if name not in names:
                names.append(name)
    if not names:
        raise ConfigError(f"backends must name at least one of {[*BACKENDS, *ALIASES]}; got {text!r}")
    return names


def aqlm_available() -> str | None:
    """None when the ``aqlm`` package can run here, else why not."""
    try:
        import aqlm  # noqa: F401
    except ImportError as err:
        return f"aqlm not installed ({err})"
    return None


def _codebook_config(backend: str, config: CodebookConfig) -> CodebookConfig | None:
    if backend == FP16:
        return None
    if backend in (CODEGEMM, CODEGEMM_SEPARATE, CODEGEMM_ROWS):
        return config
    return AQLM_FORMATS[backend]


def build_model(
    backend: str, hf_config, config: CodebookConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """The ``backend``'s random model of ``hf_config`` on ``device`` (``"meta"``: shapes only)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {list(BACKENDS)}; got {backend!r}")
    fmt = _codebook_config(backend, config)
    if fmt is None:
        # Skipping every linear leaves them dense, initialized on the device by the model's own init.
        return build_random_quantized_model(hf_config, config, device, dtype, seed, skip=_ALL_LINEARS)
    model = build_random_quantized_model(hf_config, fmt, device, dtype, seed)
    if backend in AQLM_FORMATS:
        _to_aqlm(model, fmt, dtype)
    return model


def _to_aqlm(model: nn.Module, fmt: CodebookConfig, dtype: torch.dtype) -> None:
    """Swap each CodeGEMMLinear for an ``aqlm.QuantizedLinear`` holding the same (random) tensors."""
    reason = aqlm_available()
    if reason:
        raise UnsupportedError(f"backend aqlm needs the aqlm package: {reason}")
    from aqlm import QuantizedLinear

    code_dtype = torch.int8 if fmt.nbits <= 8 else torch.int16
    for name, layer in list(quantized_modules(model)):
        n, k = layer.out_features, layer.in_features
        new = QuantizedLinear(
            k, n, in_group_size=fmt.vec_len, out_group_size=1, num_codebooks=fmt.num_codebooks,
            nbits_per_codebook=fmt.nbits, bias=layer.bias is not None, device="meta", dtype=dtype,
        )
        codes, scales = layer.row_tables()
        # AQLM keeps codes signed; random codes stay uniformly random through the wrap-around.
        codes = codes.view(code_dtype) if codes.dtype == torch.uint8 else codes.to(code_dtype)
        new.codes = nn.Parameter(codes, requires_grad=False)
        new.codebooks = nn.Parameter(
            layer.codebooks.detach().view(fmt.num_codebooks, fmt.codebook_size, 1, fmt.vec_len), requires_grad=False
        )
        new.scales = nn.Parameter(scales.detach().reshape(n, 1, 1, 1), requires_grad=False)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
        set_module(model, name, new)


def estimated_bytes(backend: str, hf_config, config: CodebookConfig, dtype: torch.dtype) -> int:
    """Peak bytes of building the ``backend``'s weights (and buffers) on the device, from a meta build.

    AQLM models are counted at their CodeGEMM stage, which is the larger one
    (``aqlm-1x16`` codes are int32 there, int16 after the swap).
    """
    stage = CODEGEMM if backend in AQLM_FORMATS else backend
    model = build_model(stage, hf_config, _codebook_config(backend, config) or config, "meta", dtype)
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
