"""Registers the GPU kernels with the dispatcher (imported by :mod:`codegemm.ops.dispatch` on CUDA).

On CUDA, for the configs compiled into the CUDA C++ library (m2v8, m1v4),
1-16 tokens go through the CUDA codebook tensor-core kernel, whose cost is
flat in the token count, except one m2v8 token, where the CUDA Psumbook GEMV
is faster (``MMA_MIN_TOKENS``); each op falls back to the next kernel inside
when a call does not fit. Other configs take the Triton Psumbook kernel. For
those configs, 17 to ``SLICED_MAX_TOKENS`` tokens go to the same ops, which run
slices of at most 16 tokens through the same kernels (``cuda_sliced``): the
weight is not rebuilt unless those kernels cannot take the layer.
More tokens (prefill) dequantize the weight into a temporary dense tensor
(CUDA for m2v8/m1v4, Triton otherwise) and multiply with cuBLAS (``dequant_dense``, under
``backend="cuda"`` because its matmul is cuBLAS); ``backend="triton"`` keeps the
all-Triton dequantize-in-registers GEMM (``triton_dequant_gemm``), which also
takes the remaining 1-16-token calls (b > 8, m > 4). On the CPU the same kernels run
under ``TRITON_INTERPRET=1`` for tests, but only when ``backend="triton"`` (or
``"cuda"`` for the prefill path) is asked for: their priorities sit below the CPU kernels', so ``auto`` never
picks the (slow) interpreter.
"""

from __future__ import annotations

import torch

from codegemm.config import CodebookConfig
from codegemm.ops import custom_ops
from codegemm.ops.cuda import CUDA_CONFIGS, MMA_MIN_TOKENS
from codegemm.ops.dispatch import Backend, KernelSpec, register_grouped_kernel, register_kernel
from codegemm.ops.triton_dequant import interpreting

PSUMBOOK_MAX_TOKENS = 16
"""Above this many tokens the Psumbook no longer fits on chip well; the GEMM takes over."""

PSUMBOOK_MAX_CODEBOOKS = 4
"""The Psumbook tile holds ``m * 2**b`` rows; more codebooks go through the GEMM."""

SLICED_MAX_TOKENS = 64
"""Up to this many tokens, the CUDA ops run slices of at most 16 tokens through the 1-16-token kernels
(:func:`codegemm.ops.cuda.token_slices`), which beats rebuilding the weight for cuBLAS: each slice costs about
one 16-token call, the rebuild the same at any count (docs/KERNELS.md v23)."""


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


def _psumbook_cuda(x, codes, codebooks, scales, bias, tiled=False):
    return custom_ops.psumbook_cuda_mm(x, codes, codebooks, scales, bias, tiled)


def _codebook_mma(x, codes, codebooks, scales, bias, tiled=False):
    return custom_ops.codebook_mma_mm(x, codes, codebooks, scales, bias, tiled)


def _cuda_config_ok(dev: torch.device, config: CodebookConfig, dtype: torch.dtype) -> bool:
    """A config and dtype the CUDA library is compiled for (the tensors are checked in the ops)."""
    return (
        dev.type == "cuda"
        and config.nbits == 8
        and (config.num_codebooks, config.vec_len) in CUDA_CONFIGS
        and dtype in (torch.float16, torch.bfloat16)
    )


def _cuda_library_ok(dev: torch.device, config: CodebookConfig, tokens: int, dtype: torch.dtype) -> bool:
    """A call the CUDA library's 1-16-token kernels take."""
    return _cuda_config_ok(dev, config, dtype) and 1 <= tokens <= PSUMBOOK_MAX_TOKENS


def _sliced_ok(dev: torch.device, config: CodebookConfig, tokens: int, dtype: torch.dtype) -> bool:
    """A call that runs as slices of at most 16 tokens (:data:`SLICED_MAX_TOKENS`)."""
    return _cuda_config_ok(dev, config, dtype) and PSUMBOOK_MAX_TOKENS < tokens <= SLICED_MAX_TOKENS


def _grouped_cuda(x, layers, bias, tiled=False):
    codes, codebooks, scales = (list(t) for t in zip(*layers))
    return custom_ops.grouped_cuda_mm(x, codes, codebooks, scales, bias, tiled)


def _gated_cuda(x, layers, bias, act, tiled=False):
    codes, codebooks, scales = (list(t) for t in zip(*layers))
    return custom_ops.gated_cuda_mm(x, codes, codebooks, scales, bias, tiled, act)


def _dequant(x, codes, codebooks, scales, bias):
    return custom_ops.dequant_mm(x, codes, codebooks, scales, bias)


def _dequant_dense(x, codes, codebooks, scales, bias, tiled=False):
    return custom_ops.dequant_dense_mm(x, codes, codebooks, scales, bias, tiled)


def _prefill_ok(tokens: int, dtype: torch.dtype) -> bool:
    return tokens > PSUMBOOK_MAX_TOKENS and dtype in custom_ops.ACTIVATION_DTYPES


register_kernel(
    KernelSpec(
        "cuda_codebook_mma",
        Backend.CUDA,
        lambda dev, cfg, tokens, dtype: (
            _cuda_library_ok(dev, cfg, tokens, dtype) and tokens >= MMA_MIN_TOKENS[(cfg.num_codebooks, cfg.vec_len)]
        ),
        _codebook_mma,
        priority=45,
        takes_tiled=True,
    )
)
register_kernel(
    KernelSpec(
        "cuda_psumbook",
        Backend.CUDA,
        _cuda_library_ok,
        _psumbook_cuda,
        priority=40,
        takes_tiled=True,
    )
)
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
    KernelSpec("cuda_sliced", Backend.CUDA, _sliced_ok, _codebook_mma, priority=27, takes_tiled=True)
)
register_kernel(
    KernelSpec(
        "dequant_dense",
        Backend.CUDA,
        lambda dev, cfg, tokens, dtype: dev.type == "cuda" and _prefill_ok(tokens, dtype),
        _dequant_dense,
        priority=25,
        takes_tiled=True,
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
register_kernel(
    KernelSpec(
        "dequant_dense_interpreted",
        Backend.CUDA,
        lambda dev, cfg, tokens, dtype: dev.type == "cpu" and interpreting() and _prefill_ok(tokens, dtype),
        _dequant_dense,
        priority=1,
        takes_tiled=True,
    )
)
register_grouped_kernel(
    KernelSpec(
        "cuda_grouped",
        Backend.CUDA,
        _cuda_library_ok,
        _grouped_cuda,
        priority=40,
        takes_tiled=True,
        gated_fn=_gated_cuda,
    )
)
register_grouped_kernel(
    KernelSpec(
        "cuda_grouped_sliced",
        Backend.CUDA,
        _sliced_ok,
        _grouped_cuda,
        priority=39,
        takes_tiled=True,
        gated_fn=_gated_cuda,
    )
)
