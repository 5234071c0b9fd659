"""Beam search over codes, minimising the ``XᵀX``-weighted output error.

Rows are independent given codebooks and scales, so every row is searched at
once; vectors ``j`` are visited in order because they interact through
``XᵀX``. For one vector of one row, with ``A = H[j, j]`` (``v x v``) and
``b = (E H)[j] + A q`` (``E`` the current error, ``q`` the current quantized
slice), the error as a function of the new slice ``u`` is
``uᵀ A u - 2 u·b + const``. The beam walks the codebooks once, replacing one
code at a time in each hypothesis and keeping the ``beam_size`` best.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_SCORE_BUDGET = 1 << 23
"""Candidate scores ``rows x beam x 2**b`` held at once."""


def _search_vector(
    codes: torch.Tensor,
    books: torch.Tensor,
    book_a: torch.Tensor,
    quad: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    s: torch.Tensor,
    beam_size: int,
) -> torch.Tensor:
    """New codes ``[R, m]`` of one vector for ``R`` rows.

    ``codes [R, m]`` current codes; ``books [m, S, v]``; ``book_a [m, S, v]``
    = ``books @ A``; ``quad [m, S]`` = ``cᵀ A c``; ``b [R, v]``; ``s [R]``.
    """
    m, size, _ = books.shape
    rows = codes.shape[0]
    hyp = codes[:, None, :]  # [R, B, m]
    partial = books[torch.arange(m, device=codes.device), codes].sum(1)[:, None, :]  # [R, B, v]
    s2 = (s * s)[:, None, None]
    for i in range(m):
        rest = partial - books[i][hyp[..., i]]  # [R, B, v]
        rest_a = rest @ a
        const = s2[..., 0] * (rest_a * rest).sum(-1) - 2.0 * s[:, None] * (rest * b[:, None, :]).sum(-1)
        lin = (2.0 * s2 * rest_a - 2.0 * s[:, None, None] * b[:, None, :]) @ books[i].T  # [R, B, S]
        score = const[..., None] + lin + s2 * quad[i]
        width = min(beam_size, score.shape[1] * size)
        best = score.reshape(rows, -1).topk(width, dim=1, largest=False, sorted=True).indices
        parent, choice = best // size, best % size
        hyp = torch.gather(hyp, 1, parent[..., None].expand(-1, -1, m)).clone()
        hyp[..., i] = choice
        partial = torch.gather(rest, 1, parent[..., None].expand(-1, -1, rest.shape[-1])) + books[i][choice]
    return hyp[:, 0, :]


@contextlib.contextmanager
def _cpu_threads(device: torch.device, count: int) -> Iterator[None]:
    """Run the sweep's many small CPU ops on ``count`` threads (restored afterwards).

    Each op is a few hundred microseconds of work; with more threads the
    fork/join barriers cost more than the op, badly so on a busy machine.
    """
    if device.type != "cpu" or torch.get_num_threads() <= count:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def beam_sweep(
    codes: torch.Tensor,
    books: torch.Tensor,
    scales: torch.Tensor,
    error: torch.Tensor,
    grad: torch.Tensor,
    hessian: torch.Tensor,
    beam_size: int,
) -> int:
    """One pass over all vectors, updating ``codes``, ``error`` and ``grad`` in place.

    ``codes int64 [N, J, m]``; ``books [m, S, v]`` (unscaled); ``scales [N, K // g]``;
    ``error [N, K]`` = ``W - Ŵ``; ``grad [N, K]`` = ``error @ H``; ``hessian [K, K]``.
    Returns the number of codes changed.
    """
    with _cpu_threads(codes.device, 1):
        return _sweep(codes, books, scales, error, grad, hessian, beam_size)


def _sweep(codes, books, scales, error, grad, hessian, beam_size) -> int:
    n, num_vectors, m = codes.shape
    size, v = books.shape[1], books.shape[2]
    k = num_vectors * v
    group = k // scales.shape[1]
    changed = 0
    step = max(1, _SCORE_BUDGET // max(1, beam_size * size))
    index = torch.arange(m, device=codes.device)
    for j in range(num_vectors):
        cols = slice(j * v, (j + 1) * v)
        a = hessian[cols, cols]
        book_a = books @ a
        quad = (book_a * books).sum(-1)
        s_all = scales[:, (j * v) // group]
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            old = codes[rows, j]
            s = s_all[rows]
            q_old = books[index, old].sum(1)  # [R, v] unscaled
            b = grad[rows, cols] + (s[:, None] * q_old) @ a
            new = _search_vector(old, books, book_a, quad, a, b, s, beam_size)
            moved = (new != old).any(-1)
            if not bool(moved.any()):
                continue
            changed += int(moved.sum())
            delta = s[:, None] * (books[index, new].sum(1) - q_old)  # [R, v] change of Ŵ
            codes[rows, j] = new
            error[rows, cols] -= delta
            grad[rows] -= delta @ hessian[cols, :]
    return changed
