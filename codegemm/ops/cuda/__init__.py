"""CUDA C++ kernels (psumbook.cu, codebook_mma.cu, psumbook_mma.cu), built with nvcc at first use and called
through ctypes.

Only the benchmark configs where Triton measurably falls short are compiled
in: m2v8 and m1v4 with 8-bit codes, fp16 codebooks and scales, fp16/bf16
activations, 1-16 tokens. Three kernels: the Psumbook GEMV (psumbook.cu), the
codebook tensor-core kernel (codebook_mma.cu: conflict-free centroid gathers +
mma.sync), which costs the same for 1-16 tokens, and for 2-4 fp16 tokens on
tiled tables a Psumbook of four tokens per entry summed on the tensor cores
(psumbook_mma.cu). All also serve
sibling layers (q/k/v, gate/up) in one launch: :func:`grouped_psumbook_cuda`,
:func:`grouped_mma_cuda` (``Segments`` in common.cuh).
:func:`cuda_psumbook_eligible` / :func:`codebook_mma_eligible` say whether a
call fits; everything else goes to the Triton kernels. Every entry point takes
``tiled``: the layer's tables are row-major or in the tiled layout of
:mod:`codegemm.layout`, which the kernels read through per-layer strides. The shared library lands in
``$CODEGEMM_CUDA_CACHE`` (default ``~/.cache/codegemm/cuda``) under a name
that holds the source hash and the GPU architecture, so edits rebuild it.
A missing ``nvcc`` or a failed build logs a warning once and the Triton path
takes over.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
from collections.abc import Callable, Sequence

import torch

from codegemm.layout import TILE_BYTES, TILE_CODE_XOR
from codegemm.ops.cuda.settled import tables_settled

logger = logging.getLogger(__name__)

_SOURCES = [pathlib.Path(__file__).with_name(name)
            for name in ("psumbook.cu", "codebook_mma.cu", "psumbook_mma.cu", "dequant.cu", "common.cuh")]
CUDA_CONFIGS = {(2, 8), (1, 4)}
"""(num_codebooks, vec_len) pairs compiled into the library (nbits = 8)."""
MAX_TOKENS = 16
MMA_MIN_TOKENS = {(2, 8): 2, (1, 4): 2}
"""(m, v) -> from this many tokens the codebook tensor-core kernel beats the CUDA Psumbook GEMV.

Measured on an H200 (docs/KERNELS.md): at one token the Psumbook wins for both configs since v12 (m1v4 70B
block 110 vs 166 µs; until v11 the tensor-core kernel won m1v4 from one token).
"""
_THREADS = 512
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
MAX_SEGMENTS = 4
"""Sibling layers one launch can serve (``Segments`` in common.cuh)."""

SEGMENT_ROW_MULTIPLE = 1024
"""Layer sizes (but the last) that every default plan can group: the Psumbook kernel's 1024 rows per block
(1-16 tokens), a multiple of the tensor-core kernel's 256. Other sizes fall back to one launch per layer."""

Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One quantized layer's ``(codes, codebooks, scales)``."""


class _Segments(ctypes.Structure):
    """``Segments`` of common.cuh: layers stacked along the output rows, each with its own tables."""

    _fields_ = [("count", ctypes.c_int), ("start", ctypes.c_int * MAX_SEGMENTS),
                ("codes", ctypes.c_void_p * MAX_SEGMENTS), ("codebooks", ctypes.c_void_p * MAX_SEGMENTS),
                ("scales", ctypes.c_void_p * MAX_SEGMENTS), ("code_row", ctypes.c_int * MAX_SEGMENTS),
                ("code_chunk", ctypes.c_int * MAX_SEGMENTS), ("scale_row", ctypes.c_int * MAX_SEGMENTS),
                ("scale_group", ctypes.c_int * MAX_SEGMENTS), ("code_xor", ctypes.c_int), ("gate_act", ctypes.c_int),
                ("weights_settled", ctypes.c_int)]


GATE_ACTS = {"silu": 1, "gelu_tanh": 2}
"""Activations the split-K reduce applies to a gated MLP's gate (``Segments.gate_act`` of common.cuh): the output is
``act(gate) * up`` for a group of exactly two equal-sized layers, gate first."""
GATE_ACT_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh"),
}
"""The same activations in PyTorch, by :data:`GATE_ACTS` name: the unfused path and the probe of a model's act_fn."""


def layer_geometry(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                   tiled: bool = False) -> tuple[int, int, int, int]:
    """``(out_features, num_vectors, num_codebooks, groups)`` of contiguous row-major or tiled tensors
    (:mod:`codegemm.layout`)."""
    m = codebooks.shape[0]
    if tiled:
        return codes.shape[1], codes.shape[0] * TILE_BYTES // m, m, scales.shape[0]
    return codes.shape[0], codes.shape[1], m, scales.shape[1]


def _segments(layers: Sequence[Layer], tiled: bool = False, gate_act: int = 0) -> _Segments:
    """Each layer's tables and their strides (contiguous tensors in the given layout); ``gate_act`` see
    :data:`GATE_ACTS`; whether the kernels may read the tables early (:func:`tables_settled`)."""
    segs = _Segments()
    segs.count = len(layers)
    segs.weights_settled = int(tables_settled(table for layer in layers for table in layer))
    segs.gate_act = gate_act
    segs.code_xor = TILE_CODE_XOR if tiled else 0
    row = 0
    for i, (codes, codebooks, scales) in enumerate(layers):
        n, num_vectors, m, groups = layer_geometry(codes, codebooks, scales, tiled)
        segs.start[i] = row
        segs.codes[i], segs.codebooks[i], segs.scales[i] = codes.data_ptr(), codebooks.data_ptr(), scales.data_ptr()
        if tiled:
            segs.code_row[i], segs.code_chunk[i], segs.scale_row[i], segs.scale_group[i] = TILE_BYTES, n * TILE_BYTES, 1, n
        else:
            segs.code_row[i], segs.code_chunk[i], segs.scale_row[i], segs.scale_group[i] = num_vectors * m, TILE_BYTES, groups, 1
        row += n
    return segs


def _nvcc() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (pathlib.Path(candidate) / "bin" / "nvcc").exists():
            return str(pathlib.Path(candidate) / "bin" / "nvcc")
    return shutil.which("nvcc")


def library_path(arch: str, defines: Sequence[str] = ()) -> pathlib.Path:
    digest = hashlib.sha256(b"".join(src.read_bytes() for src in _SOURCES)).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("CODEGEMM_CUDA_CACHE", pathlib.Path.home() / ".cache" / "codegemm" / "cuda"))
    variant = "".join(f"_{d.lower()}" for d in defines)
    return cache / f"psumbook_{digest}_{arch}{variant}.so"


def build(arch: str, defines: Sequence[str] = ()) -> pathlib.Path:
    """Compile the kernels for ``arch`` (e.g. ``sm_90``) unless the cached library is current. ``defines``: extra
    preprocessor macros for diagnostic builds (``CODEGEMM_TRACE``: scripts/trace_chain.py), cached apart."""
    path = library_path(arch, defines)
    if path.exists():
        return path
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME); the CUDA Psumbook kernel cannot be built")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    number = arch.split("_")[1]
    cmd = [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17",
           f"-gencode=arch=compute_{number},code={arch}", *(f"-D{d}" for d in defines), "-o", str(tmp),
           *(str(p) for p in _SOURCES if p.suffix == ".cu")]
    logger.info("building the CUDA Psumbook kernel: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(tmp, path)
    return path


@functools.cache
def load_library(arch: str) -> ctypes.CDLL | None:
    """The built library for ``arch``, or None (logged once) when it cannot be built or loaded."""
    if os.environ.get("CODEGEMM_DISABLE_CUDA", "0") not in ("", "0"):
        return None
    try:
        return bind_library(build(arch))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or ""
        logger.warning("CUDA Psumbook kernel unavailable, using Triton: %s %s", err, detail[-2000:])
        return None


def bind_library(path: str | os.PathLike) -> ctypes.CDLL:
    """Load a built library and declare its entry points (also used by scripts that A/B kernel builds)."""
    lib = ctypes.CDLL(str(path))
    lib.codegemm_psumbook.restype = ctypes.c_int
    lib.codegemm_psumbook.argtypes = [ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Segments)] + [
        ctypes.c_void_p] * 3 + [ctypes.c_int] * 5 + [ctypes.c_void_p]
    lib.codegemm_codebook_mma.restype = ctypes.c_int
    lib.codegemm_codebook_mma.argtypes = lib.codegemm_psumbook.argtypes
    lib.codegemm_psumbook_mma.restype = ctypes.c_int
    lib.codegemm_psumbook_mma.argtypes = lib.codegemm_psumbook.argtypes
    lib.codegemm_dequant.restype = ctypes.c_int
    lib.codegemm_dequant.argtypes = [ctypes.c_int] * 3 + [ctypes.POINTER(_Segments), ctypes.c_void_p] + [
        ctypes.c_int] * 3 + [ctypes.c_void_p]
    lib.codegemm_error_string.restype = ctypes.c_char_p
    lib.codegemm_error_string.argtypes = [ctypes.c_int]
    return lib


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def library_serves(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> bool:
    """What every kernel of the library needs of a layer's tables (in either layout): a compiled config, fp16
    tables, a GPU that runs it, strides that fit the kernels' 32-bit ones."""
    if codes.device.type != "cuda" or codes.dtype != torch.uint8:
        return False
    if (codebooks.shape[0], codebooks.shape[2]) not in CUDA_CONFIGS or codebooks.shape[1] != 256:
        return False
    if max(codes.numel(), scales.numel()) >= 2**31:  # every stride then fits the kernels' int
        return False
    if codebooks.dtype != torch.float16 or scales.dtype != torch.float16 or codebooks.data_ptr() % 16:
        return False
    return torch.cuda.get_device_capability(codes.device) >= (8, 0) and load_library(device_arch(codes.device)) is not None


def _layer_fits(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> bool:
    """:func:`library_serves` the tables, and ``dtype`` (activations or output) is one the library takes."""
    return dtype in _DTYPE_CODES and library_serves(codes, codebooks, scales)


def cuda_psumbook_eligible(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                           bias: torch.Tensor | None, tiled: bool = False) -> bool:
    """Whether this (already validated) call fits the compiled kernel's assumptions (``tiled``: the layer's
    tensors are in the tiled layout of :mod:`codegemm.layout`)."""
    if not 1 <= x.shape[0] <= MAX_TOKENS or (bias is not None and bias.dtype != x.dtype):
        return False
    _n, num_vectors, m, groups = layer_geometry(codes, codebooks, scales, tiled)
    vectors_per_chunk = TILE_BYTES // m
    if num_vectors % vectors_per_chunk or (groups > 1 and (num_vectors // groups) % vectors_per_chunk):
        return False
    return codes.data_ptr() % 16 == 0 and _layer_fits(codes, codebooks, scales, x.dtype)


def _rows(layers: Sequence[Layer], tiled: bool = False) -> list[int]:
    return [layer_geometry(*layer, tiled)[0] for layer in layers]


def grouped_eligible(x: torch.Tensor, layers: Sequence[Layer], bias: torch.Tensor | None, rows_per_block: int,
                     fits: Callable[..., bool] | None = None, tiled: bool = False) -> bool:
    """Whether sibling layers can share one launch: each fits the kernel alone (``fits``, default
    :func:`cuda_psumbook_eligible`), their K, config and scale groups agree, and every layer but the last
    ends on a block boundary (a block's rows share one codebook)."""
    fits = fits or cuda_psumbook_eligible
    if not 1 <= len(layers) <= MAX_SEGMENTS:
        return False
    first = layer_geometry(*layers[0], tiled)
    for codes, codebooks, scales in layers:
        if layer_geometry(codes, codebooks, scales, tiled)[1:] != first[1:] or codebooks.shape != layers[0][1].shape:
            return False
        if not fits(x, codes, codebooks, scales, None, tiled):
            return False
    if bias is not None and (bias.dtype != x.dtype or bias.shape[0] != sum(_rows(layers, tiled))):
        return False
    return all(n % rows_per_block == 0 for n in _rows(layers, tiled)[:-1])


def psumbook_rows_per_block(tokens: int, rpt: int) -> int:
    """Output rows one block of psumbook.cu owns: 512 threads, two lanes per row for one token."""
    return _THREADS // (2 if tokens == 1 else 1) * rpt


def plan_cuda(tokens: int, n: int, num_vectors: int, m: int, device: torch.device) -> tuple[int, int]:
    """(rows per thread or lane pair, K splits) for the plans compiled into psumbook.cu."""
    from codegemm.ops.triton_psumbook import sm_count

    # One token: two lanes per row, 4 rows per lane pair (2 for small layers); more tokens: one lane per row,
    # 2 rows per thread.
    rpt, lanes = (4, 2) if tokens == 1 else (2, 1)
    blocks = -(-n // (_THREADS // lanes * rpt))
    chunks = num_vectors // (32 // m)
    if tokens == 1 and blocks * chunks < sm_count(device):
        # Too few blocks of one chunk to give every SM one: 512-row blocks (v12, H200: 4096x4096 6.4 -> 5.7 µs).
        rpt, blocks = 2, -(-n // (_THREADS // lanes * 2))
    if tokens == 1:
        # Swept on an H200 for v12 and v20 (docs/KERNELS.md; 1, 2, 3, 4, 6, 8 chunks per block on every benchmark
        # shape): as few chunks per block as fill one wave of two blocks per SM, if that takes at most eight
        # (Llama-3-70B down, 28672x8192: 7, 23.5 vs 25.0 us at four); otherwise four, in several waves.
        per_split = -(-blocks * chunks // (2 * sm_count(device)))
        per_split = per_split if per_split <= 8 else 4
        return rpt, -(-chunks // per_split)
    # Measured on an H200 for v3 (docs/KERNELS.md): one or two chunks per block wins; many small blocks keep
    # every SM's shared-memory pipe busy.
    target = 16 * sm_count(device)
    splits = max(1, min(chunks, -(-target // blocks)))
    return rpt, splits


def _launch(entry: str, x: torch.Tensor, args: tuple, kernel: str) -> None:
    """Call one extern "C" launcher of the library on PyTorch's current stream; raise on a launch error.

    ``x``'s device is the launch device and its dtype the library's dtype code (activations, or output).
    """
    _launch_all(x, [(entry, args, kernel)])


def _launch_all(x: torch.Tensor, calls: Sequence[tuple[str, tuple, str]]) -> None:
    """:func:`_launch` for several ``(entry, args, kernel)`` in order, with the library, stream and device looked up
    once."""
    lib = load_library(device_arch(x.device))
    stream = torch.cuda.current_stream(x.device).cuda_stream
    dtype = _DTYPE_CODES[x.dtype]
    with torch.cuda.device(x.device):  # the runtime launches on the current device, not the tensors'
        for entry, args, kernel in calls:
            err = getattr(lib, entry)(dtype, *args, stream)
            if err != 0:
                reason = "config not compiled in" if err < 0 else lib.codegemm_error_string(err).decode()
                raise RuntimeError(f"CUDA {kernel} kernel launch failed ({err}): {reason}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _partials(splits: int, tokens: int, n: int, x: torch.Tensor, gate_act: int = 0) -> torch.Tensor | None:
    """fp32 split-K workspace ``[splits, T, N]``, summed in split order by the library (deterministic); a gated
    call goes through it even unsplit, since its reduce applies the activation."""
    if splits > 1 or gate_act:
        return torch.empty(splits, tokens, n, dtype=torch.float32, device=x.device)
    return None


def _output(x: torch.Tensor, n: int, gate_act: int) -> torch.Tensor:
    """``[T, N]``, or ``[T, N / 2]`` for a gated call."""
    return torch.empty(x.shape[0], n // 2 if gate_act else n, dtype=x.dtype, device=x.device)


def psumbook_matmul_cuda(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                         bias: torch.Tensor | None, rows_per_thread: int | None = None,
                         splits: int | None = None, tiled: bool = False) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` in ``x``'s dtype; the call must be :func:`cuda_psumbook_eligible` and contiguous."""
    return grouped_psumbook_cuda(x, [(codes, codebooks, scales)], bias, rows_per_thread, splits, tiled)


def psumbook_plan_rpt(tokens: int, rows_per_thread: int | None, n: int, num_vectors: int, m: int,
                      device: torch.device) -> int:
    """The rows-per-thread plan psumbook.cu will run (the compiled ones: 2, 4 or 8 for one token, else 2)."""
    rpt = rows_per_thread or plan_cuda(tokens, n, num_vectors, m, device)[0]
    return (8 if rpt >= 8 else 4 if rpt >= 4 else 2) if tokens == 1 else 2


def grouped_psumbook_cuda(x: torch.Tensor, layers: Sequence[Layer], bias: torch.Tensor | None,
                          rows_per_thread: int | None = None, splits: int | None = None,
                          tiled: bool = False, gate_act: int = 0) -> torch.Tensor:
    """``x [T, K] -> [T, sum N]``: sibling layers (same K and config) in one launch of psumbook.cu, their
    outputs side by side (``gate_act``: ``[T, N / 2]``, see :data:`GATE_ACTS`). The call must be
    :func:`grouped_eligible` for :func:`psumbook_rows_per_block` rows and its tensors contiguous (row-major, or
    ``tiled``)."""
    tokens = x.shape[0]
    codebooks = layers[0][1]
    n = sum(_rows(layers, tiled))
    _, num_vectors, m, groups = layer_geometry(*layers[0], tiled)
    v = codebooks.shape[2]
    rpt = psumbook_plan_rpt(tokens, rows_per_thread, n, num_vectors, m, x.device)
    splits = splits or plan_cuda(tokens, n, num_vectors, m, x.device)[1]
    chunks = num_vectors // (32 // m)
    per_split = -(-chunks // splits)
    used = -(-chunks // per_split)
    out = _output(x, n, gate_act)
    partial = _partials(used, tokens, n, x, gate_act)
    _launch("codegemm_psumbook", x, (
        m, v, rpt, tokens, x.data_ptr(), x.stride(0), ctypes.byref(_segments(layers, tiled, gate_act)),
        _ptr(bias), out.data_ptr(), _ptr(partial), n, num_vectors, groups,
        num_vectors if groups == 1 else num_vectors // groups, splits), "Psumbook")
    return out


MMA_CHUNK_INPUTS = 128
"""Inputs per chunk of the codebook tensor-core kernel (32 code bytes of a row)."""
MMA_MAX_X_CHUNKS = 64
"""Token-chunks of activations a block keeps in shared memory while two blocks share an SM (up to 8 tokens;
256 B each: 16 KiB beside the codebook). Above 8 tokens one block has the SM: :func:`mma_x_budget`."""
MMA_CODEBOOK_SMEM = 65536
"""Shared memory of the replicated codebook in codebook_mma.cu (m2v8; m1v4 takes half)."""
_MMA_ROWS_PER_BLOCK_TILE = 16 * 16
"""Rows per block per m-tile per warp (16 warps of 16-row mma tiles)."""


def mma_block_rows(tokens: int, tiles: int) -> int:
    """Output rows of one codebook_mma.cu block: 16 warps of ``tiles`` 16-row m-tiles up to 8 tokens; above, 256
    whatever the tiles (16 warps of one, or 8 warps of two that share each B fragment)."""
    return _MMA_ROWS_PER_BLOCK_TILE * (1 if tokens > 8 else tiles)


def codebook_mma_eligible(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None, tiled: bool = False) -> bool:
    """Whether a call fits codebook_mma.cu: the Psumbook kernel's conditions, K and groups in 128-input chunks."""
    if not cuda_psumbook_eligible(x, codes, codebooks, scales, bias, tiled):
        return False
    k = x.shape[1]
    groups = layer_geometry(codes, codebooks, scales, tiled)[3]
    if k % MMA_CHUNK_INPUTS or (groups > 1 and (k // groups) % MMA_CHUNK_INPUTS):
        return False
    return x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0


def mma_x_rows(tokens: int) -> int:
    """Token rows a chunk of activations takes on chip: above 8 tokens the kernel stages all 16 (zeros past the
    tokens) so its loads need no branch."""
    return 16 if tokens > 8 else tokens


def mma_x_budget(tokens: int, device: torch.device) -> int:
    """Token-chunks of activations a split may keep on chip. Up to 8 tokens two blocks share an SM:
    :data:`MMA_MAX_X_CHUNKS`. Above, the one block per SM may fill what the codebook leaves of the opt-in shared
    memory (H100/H200: 40 chunks of 16 tokens, against 4 at the two-block budget). Fewer splits write and reduce
    fewer fp32 partials and restage x less often: 8B block at 16 tokens 95.1 -> 86.1 µs on an H100 (docs/KERNELS.md,
    v16)."""
    if tokens <= 8 or device.type != "cuda":
        return MMA_MAX_X_CHUNKS
    return max(MMA_MAX_X_CHUNKS, (_smem_optin(device) - MMA_CODEBOOK_SMEM) // 256)


@functools.cache
def _smem_optin(device: torch.device) -> int:
    """Opt-in shared memory per block of a CUDA device, read once (the budget is asked twice per call)."""
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)


def _min_mma_splits(chunks: int, tokens: int, budget: int) -> int:
    """Fewest K splits whose largest split's activations fit: ``ceil(chunks / splits) * rows <= budget``."""
    return -(-chunks // (budget // mma_x_rows(tokens)))


def plan_mma(tokens: int, n: int, k: int, device: torch.device) -> tuple[int, int]:
    """(m-tiles per warp, K splits) for codebook_mma.cu.

    The kernel runs persistent blocks (two per SM up to 8 tokens, one above: the launch bounds) that each
    build the replicated codebook once and then take an even share of the work items (row block, split of K).
    A split's activations sit in shared memory beside the codebook, at most :func:`mma_x_budget` token-chunks.
    The split count minimises the slowest block's work, ``ceil(items / blocks) * (chunks per item + 1)``
    (the + 1 prices an item's start: x reload, code pipeline refill, partial write). Against a fixed
    "two items per block" rule this cut the 8B block from 98 to 82 µs (m2v8g128, 1 token, H200).
    """
    from codegemm.ops.triton_psumbook import sm_count

    # Up to 8 tokens one 16-row tile per warp won on an H200; above, 8 warps of two tiles (docs/KERNELS.md, v17).
    tiles = int(os.environ.get("CODEGEMM_MMA_TILES", "0")) or (2 if tokens > 8 else 1)
    resident = (2 if tokens <= 8 else 1) * sm_count(device)
    return tiles, _best_mma_splits(tokens, -(-n // mma_block_rows(tokens, tiles)), k // MMA_CHUNK_INPUTS, resident,
                                   mma_x_budget(tokens, device))


@functools.lru_cache(maxsize=4096)
def _best_mma_splits(tokens: int, row_blocks: int, chunks: int, resident: int, budget: int) -> int:
    """The split search of :func:`plan_mma`, cached: it runs once per layer shape, not once per call."""
    best: tuple[int, int] | None = None
    for splits in range(_min_mma_splits(chunks, tokens, budget), chunks + 1):
        per_split = -(-chunks // splits)
        items = row_blocks * -(-chunks // per_split)
        cost = -(-items // min(items, resident)) * (per_split + 1)
        if best is None or cost < best[0]:
            best = (cost, splits)
    return best[1] if best else 1


def codebook_mma_cuda(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                      bias: torch.Tensor | None, tiles: int | None = None, splits: int | None = None,
                      tiled: bool = False, psumbook: bool | None = None) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` through codebook_mma.cu or psumbook_mma.cu (:func:`grouped_mma_cuda`); the call
    must be :func:`codebook_mma_eligible`."""
    return grouped_mma_cuda(x, [(codes, codebooks, scales)], bias, tiles, splits, tiled, psumbook)


PSUMBOOK_MMA_MAX_TOKENS = 4
"""Tokens one Psumbook entry of psumbook_mma.cu holds (four fp16 partial sums)."""
PSUMBOOK_MMA_MAX_CHUNKS = 8
"""Chunks per split that psumbook_mma.cu stages activations for."""


PSUMBOOK_MMA_CONFIGS = {(2, 8)}
"""(m, v) that the dispatcher sends to psumbook_mma.cu when the call fits. m1v4 stays on codebook_mma.cu, which
gathers only 8 bytes per centroid and is faster (H200, 8B block, 4 tokens: 58.9 vs 66.2 µs; docs/KERNELS.md v14)."""


def psumbook_mma_fits(x: torch.Tensor, tiled: bool) -> bool:
    """Whether psumbook_mma.cu can take a :func:`codebook_mma_eligible` call: fp16 activations, at most four
    tokens, tiled tables (its conflict-free gathers rely on the tiled layout's swizzle)."""
    return tiled and x.dtype == torch.float16 and x.shape[0] <= PSUMBOOK_MMA_MAX_TOKENS


def psumbook_mma_chosen(x: torch.Tensor, codebooks: torch.Tensor, tiled: bool) -> bool:
    """Whether :func:`grouped_mma_cuda` runs psumbook_mma.cu for this call by default (it fits, and the config
    is one of :data:`PSUMBOOK_MMA_CONFIGS`)."""
    return psumbook_mma_fits(x, tiled) and (codebooks.shape[0], codebooks.shape[2]) in PSUMBOOK_MMA_CONFIGS


def plan_psumbook_mma(n: int, k: int, device: torch.device) -> tuple[int, int]:
    """(16-row tiles per warp, K splits) for psumbook_mma.cu: 1024-row blocks (one per SM, two Psumbook buffers;
    H200, docs/KERNELS.md v14: 8B block 65.5 µs against 82.2 with 512-row blocks) and the chunks per split, up to
    :data:`PSUMBOOK_MMA_MAX_CHUNKS`, that :func:`_psumbook_mma_time` models fastest. Blocks take their chunks one
    after another, so the split decides how evenly the blocks' work fills the SMs; a rule that only filled one wave
    lost 3-13% on five of the eight benchmark layers (v21)."""
    from codegemm.ops.triton_psumbook import sm_count

    tiles = int(os.environ.get("CODEGEMM_PSUMBOOK_MMA_TILES", "0")) or 4
    slots = (1 if tiles >= 4 else 2) * sm_count(device)
    chunks = k // MMA_CHUNK_INPUTS
    row_blocks = -(-n // (_MMA_ROWS_PER_BLOCK_TILE * tiles))
    per_split = min(range(1, min(PSUMBOOK_MMA_MAX_CHUNKS, chunks) + 1),
                    key=lambda c: _psumbook_mma_time(row_blocks, chunks, c, slots, n))
    return tiles, -(-chunks // per_split)


_PMMA_BLOCK_START_US = 1.0
_PMMA_CHUNK_US = 2.4
_PMMA_REDUCE_US_PER_MB = 1.0
"""psumbook_mma.cu's costs fitted to a sweep of 1-8 chunks per split on the eight benchmark layers (H200, 4 tokens,
docs/KERNELS.md v21; the model is within 4% of every point and picks the measured fastest split of each layer)."""


@functools.lru_cache(maxsize=4096)
def _psumbook_mma_time(row_blocks: int, chunks: int, per_split: int, slots: int, n: int) -> float:
    """Modelled µs of one call: the hardware hands the blocks (row block fastest, then split; the last split may be
    short) to the first free of ``slots`` block slots, each taking a start plus its chunks; then the split-K reduce
    reads the fp32 partials of four tokens."""
    import heapq

    splits = -(-chunks // per_split)
    free_at = [0.0] * slots
    end = 0.0
    for split in range(splits):
        work = _PMMA_BLOCK_START_US + min(per_split, chunks - split * per_split) * _PMMA_CHUNK_US
        for _ in range(row_blocks):
            done = heapq.heappop(free_at) + work
            end = max(end, done)
            heapq.heappush(free_at, done)
    partial_mb = splits * n * PSUMBOOK_MMA_MAX_TOKENS * 4 / 1e6 if splits > 1 else 0.0
    return end + _PMMA_REDUCE_US_PER_MB * partial_mb


def mma_rows_per_block(tokens: int, n: int, k: int, device: torch.device, tiles: int | None = None,
                       psumbook: bool = False) -> int:
    """Output rows one work item of codebook_mma.cu (``psumbook``: one block of psumbook_mma.cu) covers under the
    plan it will run."""
    if psumbook:
        return _MMA_ROWS_PER_BLOCK_TILE * (tiles or plan_psumbook_mma(n, k, device)[0])
    return mma_block_rows(tokens, tiles or plan_mma(tokens, n, k, device)[0])


def grouped_mma_cuda(x: torch.Tensor, layers: Sequence[Layer], bias: torch.Tensor | None, tiles: int | None = None,
                     splits: int | None = None, tiled: bool = False, psumbook: bool | None = None,
                     gate_act: int = 0) -> torch.Tensor:
    """``x [T, K] -> [T, sum N]``: sibling layers in one launch of codebook_mma.cu, or of psumbook_mma.cu where
    :func:`psumbook_mma_chosen` (``psumbook`` forces the choice; True needs a call that :func:`psumbook_mma_fits`). Each layer must be
    :func:`codebook_mma_eligible`, the group :func:`grouped_eligible` for :func:`mma_rows_per_block` rows.
    ``gate_act``: a gated MLP's two layers, output ``[T, N / 2]`` (:data:`GATE_ACTS`).
    More than 16 tokens run as slices (:func:`token_slices`), one launch each into the one output, with the tables
    described once: eager calls cost about one slice's Python (docs/KERNELS.md v23); each slice must be eligible."""
    tokens, k = x.shape
    codebooks = layers[0][1]
    n = sum(_rows(layers, tiled))
    _, _, m, groups = layer_geometry(*layers[0], tiled)
    v = codebooks.shape[2]
    chunks = k // MMA_CHUNK_INPUTS
    chunks_per_group = chunks if groups == 1 else chunks // groups
    out = _output(x, n, gate_act)
    segs = ctypes.byref(_segments(layers, tiled, gate_act))
    row_bytes = out.stride(0) * out.element_size()
    launches = []
    for start, stop in token_slices(tokens):
        piece = x[start:stop]
        count = stop - start
        pmma = psumbook_mma_chosen(piece, codebooks, tiled) if psumbook is None else psumbook
        if pmma:
            entry, kernel = "codegemm_psumbook_mma", "Psumbook mma"
            default_tiles, default_splits = plan_psumbook_mma(n, k, x.device)
            least_splits = -(-chunks // PSUMBOOK_MMA_MAX_CHUNKS)
        else:
            entry, kernel = "codegemm_codebook_mma", "codebook mma"
            default_tiles, default_splits = plan_mma(count, n, k, x.device)
            least_splits = _min_mma_splits(chunks, count, mma_x_budget(count, x.device))
        used_splits = max(splits or default_splits, least_splits)  # x must fit on chip
        used = -(-chunks // -(-chunks // used_splits))
        partial = _partials(used, count, n, x, gate_act)
        launches.append((entry, (
            m, v, tiles or default_tiles, count, piece.data_ptr(), x.stride(0), segs, _ptr(bias),
            out.data_ptr() + start * row_bytes, _ptr(partial), n, chunks, groups, chunks_per_group, used_splits), kernel))
    _launch_all(x, launches)
    return out


def token_slices(tokens: int) -> list[tuple[int, int]]:
    """Row ranges of at most :data:`MAX_TOKENS` tokens: full slices first, the remainder last, since the small
    kernels are cheapest for a short remainder (20 tokens as 16 + 4: the four-token Psumbook takes the 4)."""
    return [(start, min(start + MAX_TOKENS, tokens)) for start in range(0, tokens, MAX_TOKENS)]


def cuda_dequant_eligible(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                          dtype: torch.dtype, tiled: bool = False) -> bool:
    """Whether dequant.cu can rebuild this (already validated) layer's weight in ``dtype``."""
    return _layer_fits(codes, codebooks, scales, dtype)


def dequantize_cuda(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                    dtype: torch.dtype, tiled: bool = False) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype``, equal to ``reference.dequantize(..., float32).to(dtype)``.

    The call must be :func:`cuda_dequant_eligible`; inputs contiguous (row-major, or ``tiled``). Returns a
    fresh tensor.
    """
    n, num_vectors, _m, groups = layer_geometry(codes, codebooks, scales, tiled)
    m, v = codebooks.shape[0], codebooks.shape[2]
    weight = torch.empty(n, num_vectors * v, dtype=dtype, device=codes.device)
    if weight.numel():
        _launch("codegemm_dequant", weight, (
            m, v, ctypes.byref(_segments([(codes, codebooks, scales)], tiled)), weight.data_ptr(), n, num_vectors,
            num_vectors // groups), "dequantize")
    return weight
