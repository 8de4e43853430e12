"""Nearest-neighbour search and recall@K, shared by `mine` and `evaluate`.

The similarity matrix is computed in (query_chunk x gallery_chunk) blocks, keeping a running top-k
per query, so a Q x G matrix never sits in memory at once.
"""
from __future__ import annotations

import torch


def chunked_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    query_chunk: int = 1024,
    gallery_chunk: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery rows by dot product for every query row.

    exclude: Q x m gallery indices that a query may not retrieve (-1 = padding), e.g. its own
    reference image (evaluation) or its target (mining).
    Returns (scores Q x k, indices Q x k), best first.
    """
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    if not 0 < k <= n_gallery:
        raise ValueError(f"k={k} must be in 1..{n_gallery} (the gallery size)")
    best_scores = torch.empty(n_queries, k, dtype=torch.float32)
    best_indices = torch.empty(n_queries, k, dtype=torch.long)
    for q0 in range(0, n_queries, query_chunk):
        q = queries[q0 : q0 + query_chunk].float()
        run_scores = torch.full((q.shape[0], 0), float("-inf"))
        run_indices = torch.empty((q.shape[0], 0), dtype=torch.long)
        for g0 in range(0, n_gallery, gallery_chunk):
            block = q @ gallery[g0 : g0 + gallery_chunk].float().T
            if exclude is not None:
                _mask_excluded(block, exclude[q0 : q0 + query_chunk], g0)
            columns = torch.arange(g0, g0 + block.shape[1]).expand(block.shape[0], -1)
            scores = torch.cat([run_scores, block], dim=1)
            indices = torch.cat([run_indices, columns], dim=1)
            run_scores, order = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            run_indices = indices.gather(1, order)
        best_scores[q0 : q0 + q.shape[0]] = run_scores
        best_indices[q0 : q0 + q.shape[0]] = run_indices
    return best_scores, best_indices


def _mask_excluded(block: torch.Tensor, exclude: torch.Tensor, g0: int) -> None:
    local = exclude - g0
    valid = (exclude >= 0) & (local >= 0) & (local < block.shape[1])
    rows = torch.arange(block.shape[0])[:, None].expand_as(local)
    block[rows[valid], local[valid]] = float("-inf")


def recall_at_k(ranked: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """R@K = fraction of queries whose target index is among their first K ranked indices."""
    if max(ks) > ranked.shape[1]:
        raise ValueError(f"recall@{max(ks)} needs at least {max(ks)} ranked results, got {ranked.shape[1]}")
    hits = ranked == targets[:, None]
    first_hit = torch.where(hits.any(1), hits.float().argmax(1), torch.full_like(targets, ranked.shape[1]))
    return {f"r{k}": float((first_hit < k).float().mean()) for k in ks}


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)
