"""Additive quantization of one weight matrix with per-(row, group) scales.

Objective: the output error on calibration activations,
``tr(E H Eᵀ) / tr(W H Wᵀ)`` with ``E = W - Ŵ`` and ``H = XᵀX`` (identity
without activations: plain weight error). Steps:

1. scales = RMS of each (row, group) of ``W``; codebooks and codes by residual
   k-means on the scale-normalised ``v``-vectors;
2. rounds of: a beam-search sweep over codes (:mod:`codegemm.quant.beam`),
   then Adam on codebooks and (multiplicative) scales with the analytic
   gradient ``-2 E H``; stop when a round improves the error by less than
   ``tol`` (relative).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from codegemm import reference
from codegemm.config import CodebookConfig
from codegemm.quant.beam import beam_sweep
from codegemm.quant.kmeans import residual_kmeans
from codegemm.quant.options import QuantOptions

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerResult:
    """Quantized tensors of one layer and how well they fit."""

    codes: torch.Tensor
    """int64 ``[N, K // v, m]``."""
    codebooks: torch.Tensor
    """float32 ``[m, 2**b, v]``."""
    scales: torch.Tensor
    """float32 ``[N, K // g]``."""
    rel_error: float
    history: list[float]
    """Relative error after initialisation and after each round."""
    seconds: float


def _rel_error(error: torch.Tensor, grad: torch.Tensor, norm: float) -> float:
    return float((error * grad).sum()) / norm


def _adam(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codes: torch.Tensor,
    books: torch.Tensor,
    scales: torch.Tensor,
    steps: int,
    lr: float,
    norm: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` Adam steps on codebooks and scale multipliers; returns the best pair seen."""
    books_p = books.clone().requires_grad_(True)
    mult = torch.ones_like(scales, requires_grad=True)
    opt = torch.optim.Adam([books_p, mult], lr=lr)
    best = (float("inf"), books, scales)
    for step in range(steps + 1):
        w_hat = reference.dequantize(codes, books_p, scales * mult, weight.dtype)
        with torch.no_grad():
            error = weight - w_hat
            grad = error @ hessian
            loss = _rel_error(error, grad, norm)
        if loss < best[0]:
            best = (loss, books_p.detach().clone(), (scales * mult).detach().clone())
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        w_hat.backward(-2.0 * grad / norm)
        opt.step()
    return best[1], best[2]


def quantize_weight(
    weight: torch.Tensor,
    config: CodebookConfig,
    hessian: torch.Tensor | None,
    options: QuantOptions,
    generator: torch.Generator,
) -> LayerResult:
    """Quantize ``weight [N, K]`` (float32) for ``config``; ``hessian [K, K]`` = XᵀX or None.

    The hessian is used as given (any positive scale); ``None`` means the
    identity (weight error). Deterministic for a given generator state.
    """
    start = time.perf_counter()
    weight = weight.detach().float()
    n, k = weight.shape
    v, m, size = config.vec_len, config.num_codebooks, config.codebook_size
    group = config.group_size or k
    groups = k // group
    if hessian is None:
        hessian = torch.eye(k, dtype=torch.float32, device=weight.device)
    hessian = hessian.float()
    # A small ridge keeps directions the calibration never excites from drifting freely.
    ridge = 1e-4 * float(hessian.diagonal().mean().clamp_min(1e-12))
    hessian = hessian + ridge * torch.eye(k, dtype=hessian.dtype, device=hessian.device)
    norm = float(((weight @ hessian) * weight).sum().clamp_min(1e-30))

    grouped = weight.reshape(n, groups, group)
    scales = grouped.pow(2).mean(-1).sqrt().clamp_min(1e-8)  # [N, G]
    vectors = (grouped / scales[..., None]).reshape(n * (k // v), v)
    books, flat_codes = residual_kmeans(vectors, m, size, options.kmeans_iters, options.kmeans_points, generator)
    codes = flat_codes.reshape(n, k // v, m)

    error = weight - reference.dequantize(codes, books, scales, torch.float32)
    grad = error @ hessian
    history = [_rel_error(error, grad, norm)]
    logger.debug("init rel error %.5f", history[-1])
    for round_ in range(options.max_rounds):
        changed = beam_sweep(codes, books, scales, error, grad, hessian, options.beam_size)
        if options.adam_steps:
            books, scales = _adam(weight, hessian, codes, books, scales, options.adam_steps, options.adam_lr, norm)
            error = weight - reference.dequantize(codes, books, scales, torch.float32)
            grad = error @ hessian
        history.append(_rel_error(error, grad, norm))
        logger.debug("round %d: %d codes changed, rel error %.5f", round_, changed, history[-1])
        if history[-2] <= 0 or (history[-2] - history[-1]) / history[-2] < options.tol:
            break
    return LayerResult(
        codes=codes,
        codebooks=books,
        scales=scales,
        rel_error=history[-1],
        history=history,
        seconds=time.perf_counter() - start,
    )
