"""Nearest-neighbour search and recall@K, shared by `mine` and `evaluate`.

The similarity matrix is computed in (query_chunk x gallery_chunk) blocks, keeping a running top-k
per query, so a Q x G matrix never sits in memory at once (peak memory: one block, plus the running top-k).
On the CPU each of torch's T threads computes and selects its own (query_chunk / T x gallery_chunk) blocks
with a numba kernel (stages/retrieval/topk_native.py); without numba, and on CUDA, the blocks are selected
with torch ops (`_merge`).
"""
from __future__ import annotations

import functools
import logging

import torch

from stages.retrieval import topk_native

logger = logging.getLogger(__name__)

# Columns of a block are scanned in groups of this many: one max per group tells which groups can hold a
# score above a bound on the query's k-th best. Few do, so the per-block cost is about one reduction pass
# instead of a full top-k over the block (benchmarks/bench_topk.py).
GROUP = 64
# Where more than this fraction of a block's groups reach the bound (the first blocks, before the bound has
# risen), one comparison over the whole block finds the scores faster than gathering the groups.
DENSE = 0.25

# 1024 x 2048 float32 = 8 MB: a block the CPU's caches hold while it is filtered (oneDNN's rate drops by a
# third at 32 MB blocks on the project machine; benchmarks/bench_topk.py). On a GPU larger blocks pay.
QUERY_CHUNK = 1024
GALLERY_CHUNK = 2048


def _onednn_inner_product(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(queries.contiguous(), gallery.contiguous(), None, "none", [], "")


@functools.cache
def onednn_usable() -> bool:
    """Whether the private oneDNN op exists here and agrees with `@` on a small block (checked once per process).
    It is not public API: a torch build without it, or with another signature, falls back to `@`, saying so once."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    q, x = torch.randn(37, 24, generator=g), torch.randn(53, 24, generator=g)
    try:
        agrees = torch.allclose(_onednn_inner_product(q, x), q @ x.T, rtol=1e-4, atol=1e-4)
    except (RuntimeError, AttributeError, TypeError) as err:
        logger.warning("block_scores: torch.ops.mkldnn._linear_pointwise is unusable here (%s); using `@`", err)
        return False
    if not agrees:
        logger.warning("block_scores: torch.ops.mkldnn._linear_pointwise differs from `@` on a test block; using `@`")
    return agrees


@functools.cache
def native_usable() -> bool:
    """Whether chunked_topk runs its CPU blocks through stages.retrieval.topk_native (numba); without numba it
    selects with torch ops, saying so once per process."""
    if topk_native.available():
        return True
    logger.warning("chunked_topk: numba is not importable (%s); selecting top-k with torch ops on the CPU, "
                   "several times slower at large k (pip install numba)", topk_native.import_error())
    return False


def block_scores(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """queries @ gallery.T in float32. On the CPU through oneDNN's inner product (the op torch.compile's
    CPU backend emits for linear layers): about twice the rate of torch's `@` (MKL sgemm) on the project's
    AMD CPU, measured by benchmarks/bench_topk.py, when `onednn_usable()`. Elsewhere torch's matmul (cuBLAS on
    CUDA)."""
    if queries.device.type == "cpu" and onednn_usable():
        return _onednn_inner_product(queries, gallery)
    return queries @ gallery.T


@torch.no_grad()
def chunked_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    query_chunk: int = QUERY_CHUNK,
    gallery_chunk: int = GALLERY_CHUNK,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery rows by dot product for every query row (no gradient).

    exclude: Q x m gallery indices that a query may not retrieve (-1 = padding), e.g. its own
    reference image (evaluation) or its target (mining).
    device: where the blocks are computed (CPU or CUDA; default: the queries' device).
    Returns (scores Q x k, indices Q x k) on the queries' device, best first, equal scores by gallery
    index (which of several rows tied at the k-th place is kept is not defined). A query with fewer than k
    gallery rows it may retrieve gets score -inf and index -1 in the places left over (as faiss does).
    On the CPU the blocks are selected from by stages/retrieval/topk_native.py (numba): its memory is, per
    thread, one (query_chunk / T) x gallery_chunk block and 2k + 80 candidates per query of that block.
    """
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    if not 0 < k <= n_gallery:
        raise ValueError(f"k={k} must be in 1..{n_gallery} (the gallery size)")
    device = torch.device(device) if device is not None else queries.device
    gallery = gallery.to(device).float()
    if _fused(device, n_gallery):
        scores, indices = topk_native.fused_topk(
            queries.detach().to(device).float(), gallery.contiguous(), k, None if exclude is None else exclude.cpu(),
            query_chunk, gallery_chunk, block_scores, _mask_excluded)
        return scores.to(queries.device), indices.to(queries.device)
    best_scores = torch.empty(n_queries, k, dtype=torch.float32, device=queries.device)
    best_indices = torch.empty(n_queries, k, dtype=torch.long, device=queries.device)
    for q0 in range(0, n_queries, query_chunk):
        q = queries[q0 : q0 + query_chunk].to(device).float()
        run_scores = torch.empty((q.shape[0], 0), device=device)
        run_indices = torch.empty((q.shape[0], 0), dtype=torch.long, device=device)
        for g0 in range(0, n_gallery, gallery_chunk):
            block = block_scores(q, gallery[g0 : g0 + gallery_chunk])
            if exclude is not None:
                _mask_excluded(block, exclude[q0 : q0 + query_chunk].to(device), g0)
            run_scores, run_indices = _merge(run_scores, run_indices, block, g0, k)
        # best first; equal scores by gallery index (a stable sort by score of the rows sorted by index)
        run_indices, order = run_indices.sort(dim=1)
        run_scores, order = run_scores.gather(1, order).sort(dim=1, descending=True, stable=True)
        run_indices = torch.where(torch.isneginf(run_scores), -1, run_indices.gather(1, order))
        best_scores[q0 : q0 + q.shape[0]] = run_scores.to(queries.device)
        best_indices[q0 : q0 + q.shape[0]] = run_indices.to(queries.device)
    return best_scores, best_indices


@torch.no_grad()
def block_products(queries: torch.Tensor, gallery: torch.Tensor, query_chunk: int = QUERY_CHUNK,
                   gallery_chunk: int = GALLERY_CHUNK, device: torch.device | str | None = None) -> None:
    """The block products of `chunked_topk` over the whole problem and nothing else, blocked and threaded as it
    does them: the ceiling of its rate (benchmarks/bench_topk.py's `products` side)."""
    device = torch.device(device) if device is not None else queries.device
    gallery = gallery.to(device).float()
    if _fused(device, gallery.shape[0]):
        topk_native.fused_topk(queries.detach().to(device).float(), gallery.contiguous(), 1, None, query_chunk,
                               gallery_chunk, block_scores, _mask_excluded, select=False)
        return
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk].to(device).float()
        for g0 in range(0, gallery.shape[0], gallery_chunk):
            block_scores(q, gallery[g0 : g0 + gallery_chunk])


def _fused(device: torch.device, n_gallery: int) -> bool:
    """Whether chunked_topk runs on topk_native's threads (the CPU, numba importable, gallery rows fit int32)."""
    return device.type == "cpu" and n_gallery < 2**31 and native_usable()


def _merge(run_scores, run_indices, block, g0: int, k: int):
    """The running top-k (R x k', k' <= k, in no order: torch.topk runs at 3x the rate unsorted, and
    chunked_topk sorts once per query chunk) merged with a block of scores (R x C) whose columns start at g0."""
    rows, width = block.shape
    grouped = _pad_columns(block, GROUP).view(rows, -1, GROUP)
    group_max = grouped.amax(dim=2)
    # A lower bound on each row's new k-th best: its current k-th best or, with fewer than k so far, the
    # k-th largest of the block's maxima over k or more column groups (k groups reach it, so k scores do).
    # Only scores reaching the bound can matter.
    if run_scores.shape[1] == k:
        bound = run_scores.amin(dim=1, keepdim=True)
    elif width >= k:
        # strided groups (columns j, j + n, j + 2n, ...): their maxima reduce over a middle axis, which
        # vectorises; about 2k of them make a bound that few scores beyond the k best reach
        size = min(GROUP, 1 << (max(1, width // (2 * k)).bit_length() - 1))  # a power of two: no padding
        maxima = _pad_columns(block, size).view(rows, size, -1).amax(dim=1)
        bound = torch.topk(maxima, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    else:
        bound = None
    if bound is None or not torch.isfinite(bound).all():  # too few finite scores yet: merge the whole block
        scores = torch.cat([run_scores, block], dim=1)
        indices = torch.cat([run_indices, torch.arange(g0, g0 + width, device=block.device).expand(rows, -1)], dim=1)
        scores, order = torch.topk(scores, min(k, scores.shape[1]), dim=1, sorted=False)
        return scores, indices.gather(1, order)
    hit_groups_mask = group_max >= bound
    if hit_groups_mask.float().mean() > DENSE:
        new_rows, new_columns = (block >= bound).nonzero(as_tuple=True)
        new_scores = block[new_rows, new_columns]
        return _insert(run_scores, run_indices, new_rows, new_scores, new_columns + g0, k)
    hit_rows, hit_groups = hit_groups_mask.nonzero(as_tuple=True)
    if hit_rows.numel() == 0:  # (only when the bound is the running k-th best: nothing in this block beats it)
        return run_scores, run_indices
    # the scores of the hit groups that reach the bound, row by row (nonzero keeps row-major order)
    values = grouped[hit_rows, hit_groups]
    hit, lane = (values >= bound[hit_rows]).nonzero(as_tuple=True)
    return _insert(run_scores, run_indices, hit_rows[hit], values[hit, lane], hit_groups[hit] * GROUP + lane + g0, k)


def _insert(run_scores, run_indices, new_rows, new_scores, new_columns, k):
    """The top-k (unsorted) of the running top-k and new (row, score, column) entries, rows in non-decreasing
    order."""
    rows = run_scores.shape[0]
    counts = torch.bincount(new_rows, minlength=rows)
    slot = torch.arange(new_rows.numel(), device=new_rows.device) - (torch.cumsum(counts, 0) - counts)[new_rows]
    # candidates: the running top-k, then each row's new scores side by side (-inf where a row has fewer);
    # every row has at least k finite candidates, so no padding reaches the result
    kept = run_scores.shape[1]
    width = kept + int(counts.max())
    scores = new_scores.new_full((rows, width), float("-inf"))
    columns = torch.zeros((rows, width), dtype=torch.long, device=new_rows.device)
    scores[:, :kept], columns[:, :kept] = run_scores, run_indices
    position = new_rows * width + kept + slot
    scores.view(-1).index_copy_(0, position, new_scores)
    columns.view(-1).index_copy_(0, position, new_columns)
    scores, order = torch.topk(scores, k, dim=1, sorted=False)
    return scores, columns.gather(1, order)


def _pad_columns(block: torch.Tensor, size: int) -> torch.Tensor:
    """R x C scores padded with -inf columns to a multiple of size (the block itself when C is one)."""
    rows, width = block.shape
    if width % size == 0:
        return block
    return torch.cat([block, block.new_full((rows, -width % size), float("-inf"))], dim=1)


def _mask_excluded(block: torch.Tensor, exclude: torch.Tensor, g0: int) -> None:
    local = exclude - g0
    valid = (exclude >= 0) & (local >= 0) & (local < block.shape[1])
    rows = torch.arange(block.shape[0], device=block.device)[:, None].expand_as(local)
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
# it), so both candidate readings of GA's WHM are offered and chosen in params.
# Numbers from either are provisional until checked against the paper.
