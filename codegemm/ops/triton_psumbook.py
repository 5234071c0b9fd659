"""Triton Psumbook kernel for 1-16 tokens: ``y = x @ W.T`` straight from the codes.

One program owns ``BN`` output rows and a contiguous range of K tiles (a
split of K when the grid needs more programs than ``N / BN``). For each tile
of ``BJ`` vectors it builds the Psumbook on chip with one tensor-core product

    psum[i*C + c, j*T_P + t] = <codebooks[i, c, :], x[t, (j0+j)*v : (j0+j+1)*v]>

(codebooks are the A operand, kept in registers for the whole K loop; the
v-slices of all tokens are the B operand, zero-padded to 16 rows; both are
upcast to fp32 and multiplied as tf32, which holds fp16 and bf16 values exactly,
so the Psumbook entries carry no rounding beyond fp32 accumulation), then every
output row gathers one entry per (vector, codebook, token) by its codes with
``tl.gather`` (lowered through shared memory), sums codebooks and the vectors
of each scale group in fp32, and applies the group scales. Splits write fp32
partials that a second kernel sums in split order, so results are
bit-identical run to run (no float atomics).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl


@triton.jit
def _psumbook_kernel(
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
    tiles_per_split,
    V: tl.constexpr,
    V_P: tl.constexpr,
    M: tl.constexpr,
    M_P: tl.constexpr,
    C: tl.constexpr,
    C_P: tl.constexpr,
    BN: tl.constexpr,
    BJ: tl.constexpr,
    T_P: tl.constexpr,
    GPT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_n * BN + tl.arange(0, BN)
    n_mask = n < N

    # Codebooks as the dot's A operand [M_P*C_P, V_P]; padded rows/columns are zero,
    # so padded codebooks, centroids and vector lanes contribute nothing.
    r = tl.arange(0, M_P * C_P)
    r_book = r // C_P
    r_cent = r % C_P
    lane = tl.arange(0, V_P)
    cb = tl.load(
        cb_ptr + (r_book * C + r_cent)[:, None] * V + lane[None, :],
        mask=((r_book < M) & (r_cent < C))[:, None] & (lane < V)[None, :],
        other=0.0,
    ).to(tl.float32)

    col = tl.arange(0, BJ * T_P)
    col_vec = col // T_P
    col_tok = col % T_P
    book = tl.arange(0, M_P)
    vec = tl.arange(0, BJ)
    row_codes = codes_ptr + n.to(tl.int64)[None, :, None] * (J * M) + book[:, None, None]
    code_mask = (book < M)[:, None, None] & n_mask[None, :, None]
    q = tl.arange(0, GPT)

    acc = tl.zeros([BN, T_P], dtype=tl.float32)
    num_tiles = tl.cdiv(J, BJ)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    for tile in range(tile_lo, tile_hi):
        j0 = tile * BJ
        xj = j0 + col_vec
        # Masked slices are zero, so their Psumbook columns are zero whatever the code.
        xt = tl.load(
            x_ptr + col_tok[None, :] * stride_x + (xj * V)[None, :] + lane[:, None],
            mask=(lane < V)[:, None] & ((col_tok < T) & (xj < J))[None, :],
            other=0.0,
        ).to(tl.float32)
        psum = tl.dot(cb, xt, input_precision=DOT_PREC)
        vj = j0 + vec
        code = tl.load(row_codes + (vj * M)[None, None, :], mask=code_mask & (vj < J)[None, None, :], other=0)
        # The mask keeps bad codes (>= 2**b) inside the tile: wrong output, never a stray access.
        index = (code.to(tl.int32) & (C - 1)) + (book * C_P)[:, None, None]
        index = tl.reshape(tl.broadcast_to(index[:, :, :, None], [M_P, BN, BJ, T_P]), [M_P * BN, BJ * T_P])
        picked = tl.gather(psum, index, 0)
        per_vec = tl.sum(tl.reshape(picked, [M_P, BN, BJ * T_P]), axis=0)
        per_group = tl.sum(tl.reshape(per_vec, [BN, GPT, BJ // GPT, T_P]), axis=2)
        scol = j0 // VPG + q
        scale = tl.load(
            scales_ptr + n[:, None] * G + scol[None, :],
            mask=n_mask[:, None] & (scol < G)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(per_group * scale[:, :, None], axis=1)

    tok = tl.arange(0, T_P)
    store_mask = n_mask[:, None] & (tok < T)[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_s * T * N + tok[None, :] * N + n[:, None], acc, mask=store_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + tok[None, :] * N + n[:, None], acc.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _split_reduce_kernel(ws_ptr, bias_ptr, out_ptr, TN, N, S, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Sum the split partials in split order (deterministic), add bias, cast."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(S):
        acc += tl.load(ws_ptr + s * TN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class PsumbookLaunch:
    """Block sizes of one Psumbook launch (chosen by :func:`plan_psumbook` unless given)."""

    block_n: int
    block_j: int
    tokens_pad: int
    groups_per_tile: int
    split_k: int
    num_warps: int


_PSUM_TILE_BYTES = 32 * 1024
"""Shared memory for one tile's Psumbook (fp32) before the column count is cut."""


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_factor(n: int) -> int:
    return n & -n


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (a nominal 132 elsewhere, e.g. the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def plan_psumbook(
    tokens: int,
    n: int,
    num_vectors: int,
    m: int,
    codebook_size: int,
    vectors_per_group: int | None,
    device: torch.device,
    block_n: int | None = None,
    block_j: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
) -> PsumbookLaunch:
    """Choose tile sizes: the Psumbook tile fits ``_PSUM_TILE_BYTES``, the grid fills the GPU.

    ``vectors_per_group`` is ``g // v`` (None for per-row scales). A tile's
    ``block_j`` vectors either lie inside one scale group or cover whole groups.
    """
    rows = _next_pow2(m) * max(16, codebook_size)
    t_pad = _next_pow2(tokens)
    columns = max(16, _PSUM_TILE_BYTES // (4 * rows))
    bj = block_j or max(1, columns // t_pad)
    bj = min(bj, _next_pow2(num_vectors))
    if vectors_per_group is not None:
        if bj > vectors_per_group and _pow2_factor(vectors_per_group) != vectors_per_group:
            bj = _pow2_factor(vectors_per_group)
        elif bj < vectors_per_group:
            bj = min(bj, _pow2_factor(vectors_per_group))
    if bj * t_pad < 16:
        t_pad = 16 // bj
    gpt = 1 if vectors_per_group is None else max(1, bj // vectors_per_group)
    bn = block_n or (256 if n >= 2048 else 64)
    n_tiles = triton.cdiv(n, bn)
    k_tiles = triton.cdiv(num_vectors, bj)
    if split_k is None:
        split_k = max(1, min(k_tiles, triton.cdiv(2 * sm_count(device), n_tiles)))
    per_split = triton.cdiv(k_tiles, max(1, split_k))
    split_k = triton.cdiv(k_tiles, per_split)
    warps = num_warps or (8 if bn * bj * t_pad >= 4096 else 4)
    return PsumbookLaunch(bn, bj, t_pad, gpt, split_k, warps)


def psumbook_matmul_triton(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    plan: PsumbookLaunch | None = None,
) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` in ``x``'s dtype; inputs already checked (see custom_ops).

    ``codes`` uint8 ``[N, K//v, m]``, ``codebooks [m, 2**b, v]``, ``scales [N, K//g]``,
    all contiguous on ``x``'s device; ``x`` has unit stride along K.
    """
    tokens, _k = x.shape
    n, num_vectors, m = codes.shape
    size, v = codebooks.shape[1], codebooks.shape[2]
    groups = scales.shape[1]
    vpg = None if groups == 1 else num_vectors // groups
    if plan is None:
        plan = plan_psumbook(tokens, n, num_vectors, m, size, vpg, x.device)
    out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    if tokens == 0 or n == 0:
        return out
    partial = plan.split_k > 1
    target = torch.empty(plan.split_k, tokens, n, dtype=torch.float32, device=x.device) if partial else out
    k_tiles = triton.cdiv(num_vectors, plan.block_j)
    per_split = triton.cdiv(k_tiles, plan.split_k)
    grid = (triton.cdiv(n, plan.block_n), plan.split_k)
    has_bias = bias is not None
    _psumbook_kernel[grid](
        x,
        codes,
        codebooks,
        scales,
        bias if has_bias else scales,
        target,
        tokens,
        n,
        num_vectors,
        groups,
        num_vectors if vpg is None else vpg,
        x.stride(0),
        per_split,
        V=v,
        V_P=max(16, _next_pow2(v)),
        M=m,
        M_P=_next_pow2(m),
        C=size,
        C_P=max(16, size),
        BN=plan.block_n,
        BJ=plan.block_j,
        T_P=plan.tokens_pad,
        GPT=plan.groups_per_tile,
        HAS_BIAS=has_bias,
        PARTIAL=partial,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=plan.num_warps,
    )
    if partial:
        block = 1024
        _split_reduce_kernel[(triton.cdiv(tokens * n, block),)](
            target, bias if has_bias else scales, out, tokens * n, n, plan.split_k, HAS_BIAS=has_bias, BLOCK=block
        )
    return out
