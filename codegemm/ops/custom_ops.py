"""The Triton kernels as torch custom ops, so ``torch.compile(fullgraph=True)`` and CUDA graphs see one op.

Each op has a fake (meta) implementation that checks ranks, dtypes and
divisibility without touching data and returns an empty ``[T, N]`` tensor in
``x``'s dtype. The real implementations make ``x`` and the quantized tensors
contiguous (a no-op when they already are) and launch the kernel; outputs are
fresh tensors on every call. ``tiled=True`` says the layer's codes and scales
are in the tiled layout of :mod:`codegemm.layout`; the CUDA kernels read it as
it is, the others get a row-major copy.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from codegemm.errors import ConfigError, DTypeError, ShapeError
from codegemm.layout import as_rows
from codegemm.ops.cuda import (
    GATE_ACT_FUNCTIONS,
    GATE_ACTS,
    MAX_TOKENS,
    MMA_MIN_TOKENS,
    codebook_mma_cuda,
    codebook_mma_eligible,
    cuda_psumbook_eligible,
    grouped_eligible,
    grouped_mma_cuda,
    grouped_psumbook_cuda,
    layer_geometry,
    mma_rows_per_block,
    psumbook_matmul_cuda,
    psumbook_mma_chosen,
    psumbook_plan_rpt,
    psumbook_rows_per_block,
    token_slices,
)
from codegemm.ops.triton_dequant import dequant_matmul_triton
from codegemm.ops.triton_dequant_dense import dequant_dense_matmul
from codegemm.ops.triton_psumbook import psumbook_matmul_triton
from codegemm.validation import (
    KERNEL_CODE_DTYPES,
    KERNEL_FLOAT_DTYPES,
    check_quantized_metadata,
    check_tiled_metadata,
)

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = KERNEL_FLOAT_DTYPES


def check_matmul_args(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    code_dtypes: tuple[torch.dtype, ...] = KERNEL_CODE_DTYPES,
    tiled: bool = False,
) -> int:
    """Raise ShapeError/DTypeError unless the tensors describe one valid layer call (metadata only);
    return out_features."""
    if x.dim() != 2:
        raise ShapeError(f"x must have shape (tokens, in_features); got rank {x.dim()} {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise DTypeError(f"x must be float16, bfloat16 or float32 for the Triton kernels; got {x.dtype}")
    if tiled:
        n, k, _ = check_tiled_metadata(codes, codebooks, scales)
    else:
        n, k, _ = check_quantized_metadata(codes, codebooks, scales, code_dtypes)
    if x.shape[1] != k:
        raise ShapeError(f"x must have in_features={k} (codes.shape[1] * vec_len) columns; got {tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.dtype not in _FLOAT_DTYPES):
        raise ShapeError(f"bias must be a float tensor (out_features={n},); got {bias.dtype} {tuple(bias.shape)}")
    devices = {t.device for t in (x, codes, codebooks, scales) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise DTypeError(f"x, codes, codebooks, scales and bias must be on one device; got {sorted(map(str, devices))}")
    return n


def _contiguous(*tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    return [None if t is None else t.contiguous() for t in tensors]


def _rows(impl: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``impl`` (row-major tables only) behind the ``tiled`` flag: tiled tables become a row-major copy."""

    def run(x, codes, codebooks, scales, bias, tiled=False):
        codes, scales = as_rows(codes, scales, codebooks.shape[0], tiled)
        return impl(x, codes, codebooks, scales.contiguous(), bias)

    return run


_psumbook_triton = _rows(psumbook_matmul_triton)


def _psumbook_gpu(x, codes, codebooks, scales, bias, tiled=False):
    """The CUDA C++ Psumbook kernel where the call fits it, else the Triton one."""
    if cuda_psumbook_eligible(x, codes, codebooks, scales, bias, tiled):
        return psumbook_matmul_cuda(x, codes, codebooks, scales, bias, tiled=tiled)
    return _psumbook_triton(x, codes, codebooks, scales, bias, tiled)


def _slice_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full 16-token slice of ``x`` and its last slice: the two token counts its slices have (eligibility)."""
    return x[:MAX_TOKENS], x[token_slices(x.shape[0])[-1][0]:]


def _codebook_mma_gpu(x, codes, codebooks, scales, bias, tiled=False):
    """The CUDA codebook tensor-core kernel where the call fits it, else the Psumbook kernels. More than 16 tokens
    (the dispatcher sends up to ``SLICED_MAX_TOKENS``) run as 16-token slices through the same kernels, without
    rebuilding the weight; a layer they do not take (e.g. bf16 codebooks) gets the rebuild, as for more tokens,
    not per-slice Triton kernels (a compile per shape)."""
    if x.shape[0] > MAX_TOKENS:
        if codebook_mma_eligible(x[:MAX_TOKENS], codes, codebooks, scales, bias, tiled):  # every slice's count
            return codebook_mma_cuda(x, codes, codebooks, scales, bias, tiled=tiled)
        return dequant_dense_matmul(x, codes, codebooks, scales, bias, tiled)
    if codebook_mma_eligible(x, codes, codebooks, scales, bias, tiled):
        return codebook_mma_cuda(x, codes, codebooks, scales, bias, tiled=tiled)
    return _psumbook_gpu(x, codes, codebooks, scales, bias, tiled)


def _define(name: str, impl: Callable[..., torch.Tensor], code_dtypes: tuple[torch.dtype, ...], doc: str):
    """Register ``codegemm::name``: checks, contiguous inputs, ``impl`` (which takes ``tiled``); and its fake
    (shape-only) twin."""

    def op(
        x: torch.Tensor,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        scales: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        tiled: bool = False,
    ) -> torch.Tensor:
        check_matmul_args(x, codes, codebooks, scales, bias, code_dtypes, tiled)
        return impl(*_contiguous(x, codes, codebooks, scales, bias), tiled)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = doc
    custom = torch.library.custom_op(f"codegemm::{name}", mutates_args=())(op)

    @custom.register_fake
    def _fake(x, codes, codebooks, scales, bias=None, tiled=False):
        return x.new_empty(x.shape[0], check_matmul_args(x, codes, codebooks, scales, bias, code_dtypes, tiled))

    return custom


_UINT8 = (torch.uint8,)
psumbook_mm = _define("psumbook_mm", _psumbook_triton, _UINT8,
                      "Triton Psumbook matmul for 1-16 tokens: x [T, K] fp16/bf16/fp32, uint8 codes [N, K//v, m] -> [T, N].")
dequant_mm = _define("dequant_mm", _rows(dequant_matmul_triton), KERNEL_CODE_DTYPES,
                     "Triton dequantize-in-registers tensor-core GEMM for any token count: x [T, K] -> [T, N].")
dequant_dense_mm = _define("dequant_dense_mm", dequant_dense_matmul, KERNEL_CODE_DTYPES,
                           "Prefill: dequantize to a temporary dense W in x's dtype (Triton), then F.linear (cuBLAS).")
psumbook_cuda_mm = _define("psumbook_cuda_mm", _psumbook_gpu, _UINT8,
                           "CUDA C++ Psumbook kernel for 1-16 tokens; calls it does not fit go to the Triton one.")
codebook_mma_mm = _define("codebook_mma_mm", _codebook_mma_gpu, _UINT8,
                          "CUDA C++ codebook tensor-core kernel for 1-16 tokens (more in slices of 16); other calls go "
                          "to the Psumbook kernels.")


def gate(out: torch.Tensor, gate_act: int) -> torch.Tensor:
    """``act(gate) * up`` of a gated MLP's outputs ``[T, 2H]`` (gate first) in fp32, rounded once to their dtype:
    what the split-K reduce computes for ``gate_act`` (:data:`codegemm.ops.cuda.GATE_ACTS`)."""
    gate_out, up = out.float().chunk(2, dim=1)
    name = next(name for name, code in GATE_ACTS.items() if code == gate_act)
    return (GATE_ACT_FUNCTIONS[name](gate_out) * up).to(out.dtype)


def _grouped_gpu(x, codes, codebooks, scales, bias, tiled=False, gate_act=0):
    """Sibling layers in one launch of the CUDA kernel one of them alone would take; one launch per layer
    (outputs concatenated) when the group does not fit it. ``gate_act``: the two layers of a gated MLP, whose
    output ``[T, N / 2]`` the kernel's reduce (or, unfused, :func:`gate`) computes."""
    layers = list(zip(codes, codebooks, scales))
    tokens, k = x.shape
    rows = [layer_geometry(*layer, tiled)[0] for layer in layers]
    n = sum(rows)
    if tokens > MAX_TOKENS:  # 16-token slices, one launch each; otherwise each layer alone (see _codebook_mma_gpu)
        block_rows = {mma_rows_per_block(s.shape[0], n, k, x.device, psumbook=psumbook_mma_chosen(s, codebooks[0], tiled))
                      for s in _slice_heads(x)}
        if all(grouped_eligible(x[:MAX_TOKENS], layers, bias, per_block, codebook_mma_eligible, tiled)
               for per_block in block_rows):
            return grouped_mma_cuda(x, layers, bias, tiled=tiled, gate_act=gate_act)
        return _each_layer(_codebook_mma_gpu, x, layers, bias, rows, tiled, gate_act)
    _, num_vectors, m, _ = layer_geometry(*layers[0], tiled)
    v = codebooks[0].shape[2]
    use_mma = tokens >= MMA_MIN_TOKENS.get((m, v), MAX_TOKENS + 1)
    if use_mma:
        pmma = psumbook_mma_chosen(x, codebooks[0], tiled)
        rows_per_block = mma_rows_per_block(tokens, n, k, x.device, psumbook=pmma)
        if grouped_eligible(x, layers, bias, rows_per_block, codebook_mma_eligible, tiled):
            return grouped_mma_cuda(x, layers, bias, tiled=tiled, gate_act=gate_act)
    else:
        rpt = psumbook_plan_rpt(tokens, None, n, num_vectors, m, x.device)
        if grouped_eligible(x, layers, bias, psumbook_rows_per_block(tokens, rpt), tiled=tiled):
            return grouped_psumbook_cuda(x, layers, bias, tiled=tiled, gate_act=gate_act)
    return _each_layer(_codebook_mma_gpu if use_mma else _psumbook_gpu, x, layers, bias, rows, tiled, gate_act)


def _each_layer(single, x, layers, bias, rows, tiled, gate_act):
    """One launch per layer through ``single``, outputs side by side (and, gated, :func:`gate` after them)."""
    biases = [None] * len(layers) if bias is None else bias.split(rows)
    out = torch.cat([single(x, *layer, b, tiled) for layer, b in zip(layers, biases)], dim=1)
    return gate(out, gate_act) if gate_act else out


def _grouped_rows(x, codes, codebooks, scales, bias, tiled=False) -> list[int]:
    """Raise unless the lists describe sibling layers (one per entry, same K) that ``x`` feeds; each one's rows."""
    if not (len(codes) == len(codebooks) == len(scales)) or not codes:
        raise ShapeError(f"codes, codebooks and scales must be lists of one equal, non-zero length; got "
                         f"{len(codes)}, {len(codebooks)}, {len(scales)}")
    rows = [check_matmul_args(x, *layer, None, _UINT8, tiled) for layer in zip(codes, codebooks, scales)]
    n = sum(rows)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.dtype not in _FLOAT_DTYPES):
        raise ShapeError(f"bias must be a float tensor (sum of out_features={n},); got {bias.dtype} {tuple(bias.shape)}")
    return rows


def _check_grouped_args(x, codes, codebooks, scales, bias, tiled=False) -> int:
    """:func:`_grouped_rows`, summed: the grouped output's columns."""
    return sum(_grouped_rows(x, codes, codebooks, scales, bias, tiled))


def _grouped_contiguous(x, codes, codebooks, scales, bias, tiled, gate_act=0) -> torch.Tensor:
    """:func:`_grouped_gpu` on contiguous copies (no-ops when already contiguous) of every tensor."""
    return _grouped_gpu(*_contiguous(x), *([t.contiguous() for t in ts] for ts in (codes, codebooks, scales)),
                        *_contiguous(bias), tiled, gate_act)


@torch.library.custom_op("codegemm::grouped_cuda_mm", mutates_args=())
def grouped_cuda_mm(
    x: torch.Tensor,
    codes: list[torch.Tensor],
    codebooks: list[torch.Tensor],
    scales: list[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    tiled: bool = False,
) -> torch.Tensor:
    """Sibling layers that read ``x`` (q/k/v, gate/up) in one CUDA launch: ``x [T, K] -> [T, sum N]``
    (``tiled``: every layer's tables in the tiled layout)."""
    _check_grouped_args(x, codes, codebooks, scales, bias, tiled)
    return _grouped_contiguous(x, codes, codebooks, scales, bias, tiled)


@grouped_cuda_mm.register_fake
def _grouped_fake(x, codes, codebooks, scales, bias=None, tiled=False):
    return x.new_empty(x.shape[0], _check_grouped_args(x, codes, codebooks, scales, bias, tiled))


def _check_gated_args(x, codes, codebooks, scales, bias, tiled, act) -> int:
    """Raise unless the lists are a gated MLP's gate and up layers (two, equal out_features) and ``act`` is known;
    return out_features of one."""
    if act not in GATE_ACTS:
        raise ConfigError(f"act must be one of {sorted(GATE_ACTS)}; got {act!r}")
    if len(codes) != 2:
        raise ShapeError(f"codes, codebooks and scales must hold the gate and the up layer (2 each); got {len(codes)}")
    gate_rows, up_rows = _grouped_rows(x, codes, codebooks, scales, bias, tiled)
    if gate_rows != up_rows:
        raise ShapeError(f"the gate and up layers must have equal out_features; got {gate_rows} and {up_rows}")
    return gate_rows


@torch.library.custom_op("codegemm::gated_cuda_mm", mutates_args=())
def gated_cuda_mm(
    x: torch.Tensor,
    codes: list[torch.Tensor],
    codebooks: list[torch.Tensor],
    scales: list[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    tiled: bool = False,
    act: str = "silu",
) -> torch.Tensor:
    """A gated MLP's gate and up layers in one CUDA launch, the activation applied in its split-K reduce:
    ``x [T, K] -> act(x @ gate.T) * (x @ up.T) [T, N]``, each product rounded to ``x``'s dtype first."""
    _check_gated_args(x, codes, codebooks, scales, bias, tiled, act)
    return _grouped_contiguous(x, codes, codebooks, scales, bias, tiled, GATE_ACTS[act])


@gated_cuda_mm.register_fake
def _gated_fake(x, codes, codebooks, scales, bias=None, tiled=False, act="silu"):
    return x.new_empty(x.shape[0], _check_gated_args(x, codes, codebooks, scales, bias, tiled, act))
