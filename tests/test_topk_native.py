"""chunked_topk's CPU path through stages.retrieval.topk_native (numba), and its torch fallback, against a full
sort. Entries of the embeddings are multiples of 2^-9 below 1 (or small integers), so every dot product is exact
in float32 whatever the BLAS's order: the expected top-k is exact, ties included."""
import logging

import numpy as np
import pytest
import torch

from stages.retrieval import topk, topk_native
from stages.retrieval.topk import block_products, chunked_topk

pytestmark = pytest.mark.skipif(not topk_native.available(), reason="numba is not importable")


def exact_data(n_queries, n_gallery, dim, seed, levels=512):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randint(-levels, levels, (n_queries, dim), generator=g) / levels
    gallery = torch.randint(-levels, levels, (n_gallery, dim), generator=g) / levels
    return queries, gallery


def check_exact(queries, gallery, k, scores, indices, exclude=None):
    """scores: the k best of each full row, best first; indices: distinct rows holding those scores, equal scores
    by row; -inf and -1 beyond a row's allowed rows."""
    full = queries.double() @ gallery.double().T
    if exclude is not None:
        rows = torch.arange(len(queries))[:, None].expand_as(exclude)
        valid = exclude >= 0
        full[rows[valid], exclude[valid]] = float("-inf")
    expected = torch.sort(full, dim=1, descending=True).values[:, :k]
    assert scores.dtype == torch.float32 and indices.dtype == torch.long
    assert torch.equal(scores.double(), expected)
    found = indices >= 0
    assert torch.equal(found, torch.isfinite(expected))
    assert torch.equal(full.gather(1, indices.clamp(min=0))[found], scores.double()[found])
    assert bool((indices[~found] == -1).all())
    for row, score in zip(indices.tolist(), scores.tolist()):
        kept = [i for i in row if i >= 0]
        assert len(set(kept)) == len(kept)
        assert all(i < j for (i, a), (j, b) in zip(zip(row, score), zip(row[1:], score[1:])) if a == b and j >= 0)


@pytest.mark.parametrize("k", [1, 10, 64, 300, 1999, 2000])
@pytest.mark.parametrize("chunks", [(1024, 2048), (37, 300), (8, 97)])
def test_native_path_matches_a_full_sort(k, chunks):
    queries, gallery = exact_data(150, 2000, 24, seed=k)
    scores, indices = chunked_topk(queries, gallery, k, query_chunk=chunks[0], gallery_chunk=chunks[1])
    check_exact(queries, gallery, k, scores, indices)


@pytest.mark.parametrize("levels", [2, 512])  # 2: entries in {-1, -0.5, 0, 0.5}: ties everywhere
def test_exclusions_and_queries_with_fewer_allowed_rows_than_k(levels):
    queries, gallery = exact_data(90, 700, 8, seed=5, levels=levels)
    g = torch.Generator().manual_seed(6)
    exclude = torch.randint(0, 700, (90, 40), generator=g)
    exclude[::4, 20:] = -1  # padding
    exclude[7] = torch.arange(660, 700)  # row 7 may retrieve 660 rows; k = 680 leaves 20 places empty
    scores, indices = chunked_topk(queries, gallery, 680, exclude, query_chunk=32, gallery_chunk=256)
    check_exact(queries, gallery, 680, scores, indices, exclude)
    assert (indices[7] == -1).sum() == 20


def test_a_row_with_no_allowed_row_at_all():
    queries, gallery = exact_data(3, 50, 4, seed=7)
    exclude = torch.arange(50).expand(3, 50).clone()
    exclude[1, 45:] = -1  # row 1 may retrieve rows 45..49 only
    scores, indices = chunked_topk(queries, gallery, 10, exclude, gallery_chunk=16)
    check_exact(queries, gallery, 10, scores, indices, exclude)
    assert indices[0].tolist() == [-1] * 10 and (indices[1] >= 0).sum() == 5


def test_ties_across_blocks_come_by_gallery_row():
    # 5 distinct rows repeated: every score is tied hundreds of times, across every block boundary
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.0], [0.25, 0.0]])
    gallery = base.repeat(600, 1)
    queries = torch.tensor([[1.0, 0.5], [0.0, 1.0], [-1.0, -1.0]])
    for k in (5, 700, 2999):
        scores, indices = chunked_topk(queries, gallery, k, gallery_chunk=333)
        check_exact(queries, gallery, k, scores, indices)


def test_the_estimated_threshold_is_searched_again_when_it_was_too_high(monkeypatch):
    # the gallery sorted best first for every query: the first block's share of the k best is all of it, so
    # the estimate from it is far above each row's k-th best, every row ends short and is searched again
    queries, gallery = exact_data(40, 6000, 16, seed=8)
    queries = queries.abs() + 0.25  # all queries point the same way
    gallery = gallery[torch.argsort(gallery @ queries.mean(0), descending=True)]
    searched_again = []
    finish = topk_native._Selection.finish

    def spy(self, out_scores, out_columns):
        again = finish(self, out_scores, out_columns)
        searched_again.append(len(again))
        return again

    monkeypatch.setattr(topk_native._Selection, "finish", spy)
    scores, indices = chunked_topk(queries, gallery, 400, gallery_chunk=1000)
    check_exact(queries, gallery, 400, scores, indices)
    assert searched_again[0] > 0  # (the second search's rows estimate nothing)


def test_with_and_without_estimates_and_threads_the_result_is_the_same():
    queries, gallery = exact_data(300, 9000, 32, seed=9)
    args = (queries, gallery.contiguous(), 500, None, 128, 1024, topk.block_scores, topk._mask_excluded)
    with_estimates = topk_native.fused_topk(*args)
    without = topk_native.fused_topk(*args, estimate=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = topk_native.fused_topk(*args)
    finally:
        torch.set_num_threads(threads)
    for scores, indices in (without, one_thread):
        assert torch.equal(scores, with_estimates[0]) and torch.equal(indices, with_estimates[1])
    check_exact(queries, gallery, 500, *with_estimates)


def test_kth_best_and_shrink_keep_the_first_of_tied_rows():
    scores = np.array([3, 1, 2, 2, 2, 5, 2, 0, -0.0, 0.0, np.inf] + [0] * 16, dtype=np.float32)
    scratch = np.empty_like(scores)
    n = 11
    for k, expected in [(1, np.inf), (2, 5), (3, 3), (4, 2), (7, 2), (8, 1), (9, 0), (11, 0)]:
        assert topk_native._kth_best(scores, n, k, np.float32(-np.inf), np.float32(np.inf), scratch) == expected
    columns = np.arange(len(scores), dtype=np.int32)
    kept, kth = topk_native._shrink(scores, columns, n, 5, np.float32(-np.inf), True, scratch)
    assert (kept, kth) == (5, 2)
    assert columns[:5].tolist() == [0, 2, 3, 5, 10]  # 3, then the first of the 2s (rows 2, 3), 5, inf


def test_without_numba_the_torch_path_runs_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(topk_native, "available", lambda: False)
    monkeypatch.setattr(topk_native, "import_error", lambda: "No module named 'numba'")
    topk.native_usable.cache_clear()
    try:
        queries, gallery = exact_data(60, 900, 16, seed=10)
        exclude = torch.randint(0, 900, (60, 3), generator=torch.Generator().manual_seed(11))
        with caplog.at_level(logging.WARNING, logger="stages.retrieval.topk"):
            for k in (7, 450):
                scores, indices = chunked_topk(queries, gallery, k, exclude, query_chunk=16, gallery_chunk=200)
                check_exact(queries, gallery, k, scores, indices, exclude)
        warnings = [r.getMessage() for r in caplog.records if "numba" in r.getMessage()]
        assert len(warnings) == 1 and "torch ops" in warnings[0]
    finally:
        topk.native_usable.cache_clear()


def test_block_products_runs_on_either_path(monkeypatch):
    queries, gallery = exact_data(70, 500, 8, seed=12)
    block_products(queries, gallery, query_chunk=32, gallery_chunk=128)
    monkeypatch.setattr(topk, "_fused", lambda device, n_gallery: False)
    block_products(queries, gallery, query_chunk=32, gallery_chunk=128)
