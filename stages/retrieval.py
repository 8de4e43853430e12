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



# WHM, the "Weighted Harmonic Mean" protocol GA (Huang et al., TMM 2022) proposes to assess
# generalisation. Its formula could not be read (no access to the paper; the GA code does not compute
# it), so both candidate readings of ../shared/spec/methods.md §2.5 are offered and chosen in params.
# Numbers from either are provisional until checked against the paper.


def whm_over_splits(seen: float, unseen: float, beta: float) -> float:
    """(1 + β²)·R_seen·R_unseen / (β²·R_seen + R_unseen): β > 1 weighs the unseen split more."""
    denominator = beta**2 * seen + unseen
    return 0.0 if denominator == 0 else (1 + beta**2) * seen * unseen / denominator


def whm_over_recall_levels(recalls: list[float], weights: list[float]) -> float:
    """Σ_k w_k / Σ_k (w_k / R@k); 0 when any recall is 0."""
    if len(recalls) != len(weights):
        raise ValueError(f"{len(recalls)} recall levels but {len(weights)} weights")
    if any(r == 0 for r in recalls):
        return 0.0
    return sum(weights) / sum(w / r for w, r in zip(weights, recalls))
