"""Triton dequantize-in-registers GEMM for more than 16 tokens.

Each program owns a ``BT x BN`` output tile. Per K tile of ``BJ`` vectors it
rebuilds the ``BN x BJ*v`` weight tile in registers (one centroid gather per
codebook, summed in fp32, times the row's group scale), casts it to the
activations' dtype and feeds the tensor cores with ``tl.dot``. The dense
weight never reaches global memory. This is the first, correct version; its
speed belongs to the prefill work.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_gemm_kernel(
    x_ptr,
    codes_ptr,
    cb_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    T,
    N,
    J,
    G,
    VPG,
    stride_x,
    V: tl.constexpr,
    V_P: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BJ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    n = pid_n * BN + tl.arange(0, BN)
    t_mask = t < T
    n_mask = n < N
    vec = tl.arange(0, BJ)
    lane = tl.arange(0, V_P)
    lane_mask = lane < V
    row_codes = codes_ptr + n.to(tl.int64)[:, None] * (J * M)
    x_rows = x_ptr + t.to(tl.int64)[:, None, None] * stride_x
    acc = tl.zeros([BT, BN], dtype=tl.float32)
    for j0 in range(0, J, BJ):
        vj = j0 + vec
        vj_mask = vj < J
        xk = tl.load(
            x_rows + (vj * V)[None, :, None] + lane[None, None, :],
            mask=t_mask[:, None, None] & vj_mask[None, :, None] & lane_mask[None, None, :],
            other=0.0,
        )
        tile_mask = n_mask[:, None] & vj_mask[None, :]
        w = tl.zeros([BN, BJ, V_P], dtype=tl.float32)
        for i in tl.static_range(M):
            # The mask keeps bad codes (negative, >= 2**b) inside the codebook: never a stray access.
            code = tl.load(row_codes + (vj * M + i)[None, :], mask=tile_mask, other=0).to(tl.int32) & (C - 1)
            w += tl.load(
                cb_ptr + i * C * V + code[:, :, None] * V + lane[None, None, :],
                mask=lane_mask[None, None, :],
                other=0.0,
            ).to(tl.float32)
        # Masked scales are zero, so tail vectors contribute nothing.
        scale = tl.load(scales_ptr + n[:, None] * G + (vj // VPG)[None, :], mask=tile_mask, other=0.0)
        w = w * scale.to(tl.float32)[:, :, None]
        xk = tl.reshape(xk, [BT, BJ * V_P])
        w = tl.reshape(w, [BN, BJ * V_P])
        if DOT_F32:
            acc += tl.dot(xk.to(tl.float32), tl.trans(w), input_precision=DOT_PREC)
        else:
            acc += tl.dot(xk, tl.trans(w.to(x_ptr.dtype.element_ty)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + t[:, None] * N + n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=t_mask[:, None] & n_mask[None, :],
    )


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dequant_matmul_triton(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_t: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` in ``x``'s dtype; inputs already checked (see custom_ops).

    ``codes`` integer ``[N, K//v, m]``, ``codebooks [m, 2**b, v]``, ``scales [N, K//g]``,
    contiguous on ``x``'s device; ``x`` has unit stride along K.
    """
    tokens = x.shape[0]
    n, num_vectors, m = codes.shape
    size, v = codebooks.shape[1], codebooks.shape[2]
    groups = scales.shape[1]
    out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    if tokens == 0 or n == 0:
        return out
    v_pad = _next_pow2(v)
    block_j = max(1, 64 // v_pad)
    bt = block_t or (16 if tokens <= 16 else 32 if tokens <= 32 else 64)
    # The interpreter's bf16 dot is wrong (triton 3.9 CPU), and fp32 needs a full-precision dot.
    dot_f32 = x.dtype == torch.float32 or interpreting()
    has_bias = bias is not None
    grid = (triton.cdiv(n, block_n), triton.cdiv(tokens, bt))
    _dequant_gemm_kernel[grid](
        x,
        codes,
        codebooks,
        scales,
        bias if has_bias else scales,
        out,
        tokens,
        n,
        num_vectors,
        groups,
        num_vectors if groups == 1 else num_vectors // groups,
        x.stride(0),
        V=v,
        V_P=v_pad,
        M=m,
        C=size,
        BT=bt,
        BN=block_n,
        BJ=block_j,
        HAS_BIAS=has_bias,
        DOT_F32=dot_f32,
        DOT_PREC="ieee",
        num_warps=num_warps,
    )
    return out
