"""Codebook initialisation: (residual) k-means on scale-normalised ``v``-vectors."""

from __future__ import annotations

import torch

_DIST_BUDGET = 1 << 24
"""Point-centroid distances computed at once; bounds peak memory."""


def nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index ``int64 [P]`` of the nearest centroid ``[S, v]`` to each point ``[P, v]`` (squared L2)."""
    size = centroids.shape[0]
    sq = (centroids * centroids).sum(-1)
    out = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    step = max(1, _DIST_BUDGET // max(1, size))
    for start in range(0, points.shape[0], step):
        chunk = points[start : start + step]
        dist = torch.addmm(sq[None, :], chunk, centroids.T, alpha=-2.0)
        out[start : start + step] = dist.argmin(-1)
    return out


def kmeans(points: torch.Tensor, size: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means: ``size`` centroids ``[size, v]`` of ``points [P, v]``.

    Centroids start at distinct random points (with replacement and a little
    noise when there are fewer points than centroids); an emptied cluster is
    re-seeded at a random point, so every centroid stays in use.
    """
    num = points.shape[0]
    if num >= size:
        start = torch.randperm(num, generator=generator)[:size].to(points.device)
        centroids = points[start].clone()
    else:
        start = torch.randint(0, num, (size,), generator=generator).to(points.device)
        noise = torch.randn(size, points.shape[1], generator=generator, dtype=points.dtype).to(points.device)
        centroids = points[start] + 1e-3 * points.std().clamp_min(1e-8) * noise
    for _ in range(iters):
        assign = nearest(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=size).to(points.dtype)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if bool(empty.any()):
            refill = torch.randint(0, num, (int(empty.sum()),), generator=generator).to(points.device)
            centroids[empty] = points[refill]
    return centroids


def residual_kmeans(
    vectors: torch.Tensor,
    num_codebooks: int,
    size: int,
    iters: int,
    max_points: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebooks ``[m, size, v]`` and codes ``int64 [P, m]`` for ``vectors [P, v]``.

    Codebook ``i`` is fitted (on at most ``max_points`` sampled vectors) to the
    residual that codebooks ``0..i-1`` leave, then every vector is assigned.
    """
    num, vec_len = vectors.shape
    residual = vectors.clone()
    books = torch.empty(num_codebooks, size, vec_len, dtype=vectors.dtype, device=vectors.device)
    codes = torch.empty(num, num_codebooks, dtype=torch.long, device=vectors.device)
    for i in range(num_codebooks):
        if num > max_points:
            sample = residual[torch.randperm(num, generator=generator)[:max_points].to(residual.device)]
        else:
            sample = residual
        books[i] = kmeans(sample, size, iters, generator)
        codes[:, i] = nearest(residual, books[i])
        residual -= books[i][codes[:, i]]
    return books, codes
