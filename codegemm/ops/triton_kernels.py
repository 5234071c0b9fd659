"""Registers the Triton kernels with the dispatcher (imported by :mod:`codegemm.ops.dispatch` on CUDA).

On CUDA, 1-16 tokens go through the Psumbook kernel and everything else
through the dequantize-in-registers GEMM. On the CPU the same kernels run
under ``TRITON_INTERPRET=1`` for tests, but only when ``backend="triton"`` is
asked for: their priorities sit below the CPU kernels', so ``auto`` never
picks the (slow) interpreter.
"""

from __future__ import annotations

import torch

from codegemm.config import CodebookConfig
from codegemm.ops import custom_ops
from codegemm.ops.dispatch import Backend, KernelSpec, register_kernel
from codegemm.ops.triton_dequant import interpreting

PSUMBOOK_MAX_TOKENS = 16
"""Above this many tokens the Psumbook no longer fits on chip well; the GEMM takes over."""

PSUMBOOK_MAX_CODEBOOKS = 4
"""The Psumbook tile holds ``m * 2**b`` rows; more codebooks go through the GEMM."""


def _psumbook_ok(config: CodebookConfig, tokens: int, dtype: torch.dtype) -> bool:
    return (
        config.supports_psumbook
        and config.num_codebooks <= PSUMBOOK_MAX_CODEBOOKS
        and 1 <= tokens <= PSUMBOOK_MAX_TOKENS
        and dtype in custom_ops.ACTIVATION_DTYPES
    )


def _on_device(device: torch.device) -> bool:
    """CUDA, or the CPU when Triton interprets kernels there."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _psumbook(x, codes, codebooks, scales, bias):
    return custom_ops.psumbook_mm(x, codes, codebooks, scales, bias)


def _dequant(x, codes, codebooks, scales, bias):
    return custom_ops.dequant_mm(x, codes, codebooks, scales, bias)


def _cuda_priority(device: torch.device, high: int, low: int) -> int:
    return high if device.type == "cuda" else low


register_kernel(
    KernelSpec(
        "triton_psumbook",
        Backend.TRITON,
        lambda dev, cfg, tokens, dtype: dev.type == "cuda" and _psumbook_ok(cfg, tokens, dtype),
        _psumbook,
        priority=30,
    )
)
register_kernel(
    KernelSpec(
        "triton_dequant_gemm",
        Backend.TRITON,
        lambda dev, cfg, tokens, dtype: dev.type == "cuda" and dtype in custom_ops.ACTIVATION_DTYPES,
        _dequant,
        priority=20,
    )
)
register_kernel(
    KernelSpec(
        "triton_psumbook_interpreted",
        Backend.TRITON,
        lambda dev, cfg, tokens, dtype: dev.type == "cpu" and interpreting() and _psumbook_ok(cfg, tokens, dtype),
        _psumbook,
        priority=2,
    )
)
register_kernel(
    KernelSpec(
        "triton_dequant_gemm_interpreted",
        Backend.TRITON,
        lambda dev, cfg, tokens, dtype: dev.type == "cpu" and interpreting() and dtype in custom_ops.ACTIVATION_DTYPES,
        _dequant,
        priority=1,
    )
)
