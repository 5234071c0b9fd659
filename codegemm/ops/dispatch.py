"""The single place where a matmul kernel is chosen.

Kernels register a :class:`KernelSpec` (a name, a backend, a predicate over
device, config, token count and dtype, and the callable). :func:`select_kernel`
returns the highest-priority kernel whose predicate accepts the call, and falls
back to the plain-PyTorch reference. Modules never choose kernels themselves.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Callable, Protocol

import torch

from codegemm import reference
from codegemm.config import CodebookConfig
from codegemm.errors import UnsupportedError
from codegemm.layout import as_rows
from codegemm.ops.cpu import dense_matmul_cpu, psumbook_matmul_cpu


class Backend(str, enum.Enum):
    """Kernel families; string values so CLI flags work as they are."""

    AUTO = "auto"
    REFERENCE = "reference"
    CPU = "cpu"
    TRITON = "triton"
    CUDA = "cuda"


class MatmulKernel(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor: ...


Predicate = Callable[[torch.device, CodebookConfig, int, torch.dtype], bool]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str
    backend: Backend
    supports: Predicate
    fn: MatmulKernel
    priority: int = 0
    takes_tiled: bool = False
    """Whether ``fn`` takes ``tiled=True`` tables (:mod:`codegemm.layout`); others get a row-major copy."""
    gated_fn: Callable[..., torch.Tensor] | None = None
    """Grouped kernels only: ``(x, [gate, up], bias, act, tiled=...)`` -> ``act(gate) * up`` fused (see
    :func:`gated_matmul`); None when the kernel has no fused form."""


_KERNELS: list[KernelSpec] = []
_GROUPED_KERNELS: list[KernelSpec] = []
"""Kernels that serve sibling layers in one launch; their ``fn`` takes ``(x, layers, bias)``."""

CPU_PSUMBOOK_MAX_TOKENS = 32
"""Above this many tokens, dequantize-then-matmul beats the Psumbook on CPU (docs/BENCHMARKS.md)."""


def _register(registry: list[KernelSpec], spec: KernelSpec) -> None:
    registry[:] = [k for k in registry if k.name != spec.name]
    registry.append(spec)
    registry.sort(key=lambda k: -k.priority)


def register_kernel(spec: KernelSpec) -> None:
    """Add a kernel; later registrations with the same name replace earlier ones."""
    _register(_KERNELS, spec)


def register_grouped_kernel(spec: KernelSpec) -> None:
    """Add a grouped kernel (see :func:`grouped_matmul`); same-name registrations replace earlier ones."""
    _register(_GROUPED_KERNELS, spec)


def _first_fit(registry: list[KernelSpec], device: torch.device, config: CodebookConfig, tokens: int,
               dtype: torch.dtype, backend: Backend) -> KernelSpec | None:
    """The highest-priority kernel of ``registry`` in ``backend``'s family (any for AUTO) that takes the call."""
    for spec in registry:
        if backend is not Backend.AUTO and spec.backend is not backend:
            continue
        if spec.supports(device, config, tokens, dtype):
            return spec
    return None


def _reference_fp32(x, codes, codebooks, scales, bias):
    """Fallback on any device: the spec in float32, cast back to the input dtype."""
    if x.shape[0] > CPU_PSUMBOOK_MAX_TOKENS:
        out = reference.dense_matmul(x, codes, codebooks, scales, bias, torch.float32)
    else:
        out = reference.psumbook_matmul(x, codes, codebooks, scales, bias, torch.float32)
    return out.to(x.dtype)


REFERENCE_KERNEL = KernelSpec("reference", Backend.REFERENCE, lambda *_: True, _reference_fp32, priority=-100)

register_kernel(
    KernelSpec(
        "cpu_psumbook",
        Backend.CPU,
        lambda dev, cfg, tokens, dtype: dev.type == "cpu" and tokens <= CPU_PSUMBOOK_MAX_TOKENS,
        psumbook_matmul_cpu,
        priority=10,
    )
)
register_kernel(
    KernelSpec("cpu_dense", Backend.CPU, lambda dev, cfg, tokens, dtype: dev.type == "cpu", dense_matmul_cpu, priority=5)
)


def _load_gpu_kernels() -> None:
    """Import GPU kernel modules so they register themselves; absent Triton is not an error."""
    try:
        import codegemm.ops.triton_kernels  # noqa: F401
    except ImportError:
        pass


def select_kernel(
    device: torch.device,
    config: CodebookConfig,
    tokens: int,
    dtype: torch.dtype,
    backend: Backend | str = Backend.AUTO,
) -> KernelSpec:
    """The kernel for one call; ``backend`` restricts the choice to one family."""
    backend = Backend(backend)
    if backend is Backend.REFERENCE:
        return REFERENCE_KERNEL
    if device.type == "cuda" or backend in (Backend.TRITON, Backend.CUDA):
        _load_gpu_kernels()
    spec = _first_fit(_KERNELS, device, config, tokens, dtype, backend)
    if spec is not None:
        return spec
    if backend is Backend.AUTO:
        return REFERENCE_KERNEL
    raise UnsupportedError(
        f"backend={backend.value!r} has no kernel for device={device.type}, config={config.name}, "
        f"tokens={tokens}, dtype={dtype}; use backend='auto' to fall back"
    )


def codebook_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    config: CodebookConfig,
    backend: Backend | str = Backend.AUTO,
    tiled: bool = False,
) -> torch.Tensor:
    """``x [T, K] @ W.T + bias -> [T, N]`` in ``x``'s dtype through the chosen kernel (``tiled``: the
    tables are in the tiled layout of :mod:`codegemm.layout`)."""
    spec = select_kernel(x.device, config, x.shape[0], x.dtype, backend)
    if not tiled:
        return spec.fn(x, codes, codebooks, scales, bias)
    if spec.takes_tiled:
        return spec.fn(x, codes, codebooks, scales, bias, tiled=True)
    codes, scales = as_rows(codes, scales, config.num_codebooks, tiled=True)
    return spec.fn(x, codes, codebooks, scales, bias)


def select_grouped_kernel(
    device: torch.device,
    config: CodebookConfig,
    tokens: int,
    dtype: torch.dtype,
    backend: Backend | str = Backend.AUTO,
) -> KernelSpec | None:
    """The grouped kernel for sibling layers of one call (see :func:`grouped_matmul`), or None."""
    backend = Backend(backend)
    if backend is Backend.REFERENCE:
        return None
    if device.type == "cuda":
        _load_gpu_kernels()
    return _first_fit(_GROUPED_KERNELS, device, config, tokens, dtype, backend)


def grouped_matmul(
    x: torch.Tensor,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    bias: torch.Tensor | None,
    config: CodebookConfig,
    backend: Backend | str = Backend.AUTO,
    tiled: bool = False,
) -> torch.Tensor | None:
    """``x [T, K] -> [T, sum N]`` for sibling layers ``(codes, codebooks, scales)`` of one config that read
    the same ``x``, in one launch; ``bias`` is their biases side by side. None when no grouped kernel fits
    the call: the caller then runs each layer through :func:`codebook_matmul`, which is what a grouped
    kernel's result equals up to fp32 summation order. ``tiled``: every layer's tables are tiled; only
    grouped kernels that take them are used."""
    spec = select_grouped_kernel(x.device, config, x.shape[0], x.dtype, backend)
    if spec is None or (tiled and not spec.takes_tiled):
        return None
    return spec.fn(x, layers, bias, tiled=True) if tiled else spec.fn(x, layers, bias)


def gated_matmul(
    x: torch.Tensor,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    bias: torch.Tensor | None,
    config: CodebookConfig,
    act: str,
    backend: Backend | str = Backend.AUTO,
    tiled: bool = False,
) -> torch.Tensor | None:
    """``act(x @ gate.T) * (x @ up.T)`` for a gated MLP's ``layers = [gate, up]`` in one launch whose split-K
    reduce applies the activation (``act``: a key of :data:`codegemm.ops.cuda.GATE_ACTS`), or None when no grouped
    kernel with a fused form fits: the caller then runs the layers and the activation as the model does."""
    spec = select_grouped_kernel(x.device, config, x.shape[0], x.dtype, backend)
    if spec is None or spec.gated_fn is None or (tiled and not spec.takes_tiled):
        return None
    return spec.gated_fn(x, layers, bias, act, tiled=tiled)
