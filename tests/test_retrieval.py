import pytest
import torch

from stages.common.errors import StageError
from stages.mine import MineConfig
from stages.retrieval.negatives import hard_negatives, never_negatives, read_negatives, to_table
from stages.retrieval import topk
from stages.retrieval.topk import block_scores, chunked_topk, recall_at_k
from stages.retrieval.whm import whm_over_recall_levels, whm_over_splits


def test_recall_at_k_on_hand_built_embeddings():
    # gallery: 4 orthogonal directions; queries point at known gallery rows
    gallery = torch.eye(4)
    queries = torch.tensor([[1.0, 0.1, 0, 0], [0, 0.2, 1.0, 0], [0.9, 0, 0, 1.0], [0, 1.0, 0.5, 0]])
    targets = torch.tensor([0, 3, 3, 2])
    # rankings: q0 -> 0,1,.. ; q1 -> 2,1,.. (target 3 is tied last) ; q2 -> 3,0 ; q3 -> 1,2
    _, ranked = chunked_topk(queries, gallery, k=4)
    assert ranked[0, 0] == 0 and ranked[1, :2].tolist() == [2, 1] and ranked[2, :2].tolist() == [3, 0]
    recalls = recall_at_k(ranked, targets, [1, 2, 4])
    assert recalls == {"r1": 0.5, "r2": 0.75, "r4": 1.0}


def test_excluded_reference_is_never_retrieved():
    gallery = torch.eye(3)
    queries = torch.tensor([[1.0, 0.5, 0.0]])
    _, ranked = chunked_topk(queries, gallery, k=2, exclude=torch.tensor([[0]]))
    assert ranked.tolist() == [[1, 2]]


@pytest.mark.parametrize("query_chunk,gallery_chunk", [(7, 5), (1000, 1000), (1, 64)])
def test_chunked_topk_matches_brute_force(query_chunk, gallery_chunk):
    g = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(53, 16, generator=g), torch.randn(97, 16, generator=g)
    exclude = torch.randint(0, 97, (53, 2), generator=g)
    exclude[::3, 1] = -1  # padding
    scores, indices = chunked_topk(queries, gallery, 10, exclude, query_chunk, gallery_chunk)
    full = queries @ gallery.T
    for row in range(53):
        for col in exclude[row].tolist():
            if col >= 0:
                full[row, col] = float("-inf")
    expected_scores, expected_indices = full.topk(10, dim=1)
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(scores, expected_scores, atol=1e-5)


@pytest.mark.parametrize("ascending", [False, True])
def test_chunked_topk_group_filter_matches_brute_force(ascending):
    # galleries wider than a column group: later blocks go through the group-max filter; with `ascending`
    # every block beats the previous one, so the filter keeps many groups
    g = torch.Generator().manual_seed(1)
    queries, gallery = torch.randn(300, 32, generator=g), torch.randn(2000, 32, generator=g)
    if ascending:
        gallery = gallery[torch.argsort(gallery @ queries.mean(0))]
    scores, indices = chunked_topk(queries, gallery, 20, query_chunk=128, gallery_chunk=500)
    expected_scores, expected_indices = (queries @ gallery.T).topk(20, dim=1)
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(scores, expected_scores, atol=1e-5)


def test_chunked_topk_keeps_every_copy_of_a_tied_score():
    # a gallery of 3 distinct rows repeated: the top-5 scores are ties that span blocks
    base = torch.eye(3)
    gallery = base.repeat(200, 1)
    queries = torch.tensor([[1.0, 0.5, 0.0]])
    scores, indices = chunked_topk(queries, gallery, 5, gallery_chunk=128)
    assert scores.tolist() == [[1.0] * 5]
    assert all(i % 3 == 0 for i in indices[0].tolist()) and len(set(indices[0].tolist())) == 5
    assert indices[0].tolist() == sorted(indices[0].tolist())  # equal scores by gallery index


def test_equal_scores_come_in_gallery_order():
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scores, indices = chunked_topk(torch.tensor([[1.0, 0.5]]), gallery, 5, gallery_chunk=2)
    assert scores.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.5]]
    assert indices[0, :4].tolist() == [1, 2, 3, 4] and indices[0, 4] in (0, 5)  # a tie at the k-th place


@pytest.mark.parametrize("shape", [(1, 16, 1), (53, 16, 97), (1024, 512, 2048), (300, 7, 65)])
def test_block_scores_equal_the_matmul(shape):
    g = torch.Generator().manual_seed(2)
    rows, dim, cols = shape
    queries, gallery = torch.randn(rows, dim, generator=g), torch.randn(cols, dim, generator=g)
    expected = (queries.double() @ gallery.double().T).float()
    # float32 rounding of a sum of `dim` products, whatever the BLAS's order
    assert torch.allclose(block_scores(queries, gallery), expected, rtol=1e-5, atol=1e-5 * dim**0.5)


@pytest.mark.parametrize("dense", [0.0, 0.25, 1.0])  # every block compared whole, the default, groups only
@pytest.mark.parametrize("k", [1, 50, 300])
def test_chunked_topk_at_the_default_block_size_matches_brute_force(k, dense, monkeypatch):
    monkeypatch.setattr(topk, "DENSE", dense)
    # several default-sized blocks, rows whose hit counts differ. Entries are multiples of 2^-9 below 1,
    # so every dot product is exact in float32 whatever the BLAS's order; ties can occur, in any order.
    g = torch.Generator().manual_seed(3)
    queries = torch.randint(-512, 512, (1100, 24), generator=g) / 512
    gallery = torch.randint(-512, 512, (5000, 24), generator=g) / 512
    exclude = torch.randint(0, 5000, (1100, 3), generator=g)
    scores, indices = chunked_topk(queries, gallery, k, exclude)
    full = queries.double() @ gallery.double().T
    full[torch.arange(1100)[:, None].expand_as(exclude), exclude] = float("-inf")
    assert torch.equal(scores.double(), full.topk(k, dim=1).values)
    assert torch.equal(full.gather(1, indices), scores.double())  # each index has the score beside it
    assert all(len(set(row)) == k for row in indices.tolist())


def test_chunked_topk_takes_strided_inputs_that_require_grad():
    g = torch.Generator().manual_seed(4)
    queries = torch.randn(40, 64, generator=g).T.requires_grad_()  # 64 x 40, not contiguous
    gallery = torch.randn(40, 300, generator=g)[:, ::3].T            # 100 x 40, strided rows
    scores, indices = chunked_topk(queries, gallery, 5, gallery_chunk=64)
    expected = (queries @ gallery.T).detach().topk(5, dim=1)
    assert not scores.requires_grad
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(scores, expected.values, atol=1e-5)


@pytest.mark.parametrize("gallery_chunk", [1, 3, 2048])
def test_a_query_with_fewer_than_k_retrievable_rows_gets_minus_one(gallery_chunk):
    gallery = torch.eye(4) * torch.tensor([4.0, 3.0, 2.0, 1.0])[:, None]
    queries = torch.ones(2, 4)
    exclude = torch.tensor([[-1, -1], [0, 2]])
    scores, indices = chunked_topk(queries, gallery, 4, exclude, gallery_chunk=gallery_chunk)
    assert indices.tolist() == [[0, 1, 2, 3], [1, 3, -1, -1]]
    assert scores.tolist() == [[4.0, 3.0, 2.0, 1.0], [3.0, 1.0, float("-inf"), float("-inf")]]


def test_recall_needs_enough_ranked_results():
    with pytest.raises(ValueError, match="recall@5"):
        recall_at_k(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), [1, 5])


def test_mining_matches_brute_force_and_never_returns_the_target(tmp_path):
    g = torch.Generator().manual_seed(1)
    queries, gallery = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (40,), generator=g)
    cfg = MineConfig(k=5, query_chunk=6, gallery_chunk=7, batch_size=8, device="cpu", aoq_i2t_k=1, aoq_t2i_k=1)
    scores, indices = hard_negatives(queries, targets[:, None], gallery, cfg)
    for row in range(40):
        sims = queries[row] @ gallery.T
        sims[targets[row]] = float("-inf")
        assert indices[row].tolist() == sims.topk(5).indices.tolist()
        assert targets[row].item() not in indices[row].tolist()
    gallery_ids = [f"img{i}" for i in range(30)]
    query_ids = [f"q{i}" for i in range(40)]
    path = tmp_path / "neg.parquet"
    import pyarrow.parquet as pq

    pq.write_table(to_table(query_ids, gallery_ids, scores, indices), path)
    negatives = read_negatives(path)
    assert negatives["q3"] == [gallery_ids[i] for i in indices[3].tolist()]
    assert len(negatives) == 40 and all(len(v) == 5 for v in negatives.values())


def test_mined_negatives_never_hold_the_reference_or_under_the_caption_protocol_an_image_with_its_caption():
    g = torch.Generator().manual_seed(2)
    gallery_ids = [f"img{i}" for i in range(12)]
    captions = ["red circle", "blue square", "red circle", "green", "blue square", "red circle"] + \
        [f"scene {i}" for i in range(6)]
    records = [{"query_id": "q0", "reference_id": "img3", "target_id": "img0"},   # target caption on img2, img5
               {"query_id": "q1", "reference_id": "img0", "target_id": "img4"},   # target caption on img1
               {"query_id": "q2", "reference_id": "elsewhere", "target_id": "img7"}]  # reference not in the gallery
    never = never_negatives(records, gallery_ids, captions, by_caption=True)
    assert [sorted(i for i in row.tolist() if i >= 0) for row in never] == [[0, 2, 3, 5], [0, 1, 4], [7]]
    # under the target protocol a shared caption is no answer: only the target and the reference are kept out
    unscored = never_negatives(records, gallery_ids, captions, by_caption=False)
    assert [sorted(i for i in row.tolist() if i >= 0) for row in unscored] == [[0, 3], [0, 4], [7]]
    # queries that sit right on the excluded images: without the rule they would be mined first
    gallery = torch.randn(12, 6, generator=g)
    queries = torch.stack([gallery[[0, 2, 3, 5]].sum(0), gallery[[0, 1, 4]].sum(0), gallery[7]])
    cfg = MineConfig(k=4, query_chunk=2, gallery_chunk=5, batch_size=8, device="cpu", aoq_i2t_k=1, aoq_t2i_k=1)
    _, indices = hard_negatives(queries, never, gallery, cfg)
    for row, excluded in zip(indices.tolist(), ([0, 2, 3, 5], [0, 1, 4], [7])):
        assert not set(row) & set(excluded) and len(set(row)) == 4
    with pytest.raises(StageError, match="mine.k=9"):
        hard_negatives(queries, never, gallery, MineConfig(k=9, query_chunk=2, gallery_chunk=5, batch_size=8,
                                                           device="cpu", aoq_i2t_k=1, aoq_t2i_k=1))


def test_whm_over_splits_is_the_f_beta_combination():
    assert whm_over_splits(60.0, 40.0, beta=1.0) == pytest.approx(48.0)  # the plain harmonic mean
    assert whm_over_splits(60.0, 40.0, beta=2.0) == pytest.approx(5 * 60 * 40 / (4 * 60 + 40))
    assert whm_over_splits(60.0, 40.0, beta=2.0) < whm_over_splits(60.0, 40.0, beta=0.5)  # β weighs unseen
    assert whm_over_splits(0.0, 0.0, beta=1.0) == 0.0


def test_whm_over_recall_levels_is_a_weighted_harmonic_mean():
    assert whm_over_recall_levels([20.0, 50.0], [1.0, 1.0]) == pytest.approx(2 / (1 / 20 + 1 / 50))
    assert whm_over_recall_levels([20.0, 50.0], [3.0, 1.0]) == pytest.approx(4 / (3 / 20 + 1 / 50))
    assert whm_over_recall_levels([0.0, 50.0], [1.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="2 recall levels but 1 weights"):
        whm_over_recall_levels([20.0, 50.0], [1.0])


def test_block_scores_falls_back_to_matmul_when_the_private_op_is_missing_or_wrong(monkeypatch, caplog):
    from stages.retrieval import topk

    g = torch.Generator().manual_seed(5)
    q, x = torch.randn(9, 16, generator=g), torch.randn(11, 16, generator=g)
    expected = q @ x.T
    topk.onednn_usable.cache_clear()
    if torch.backends.mkldnn.is_available():
        assert topk.onednn_usable()  # on this build the op exists and agrees
    for broken, message in ((lambda a, b: (_ for _ in ()).throw(RuntimeError("no such op")), "is unusable here"),
                            (lambda a, b: a @ b.T + 1.0, "differs from `@`")):
        monkeypatch.setattr(topk, "_onednn_inner_product", broken)
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
        topk.onednn_usable.cache_clear()
        with caplog.at_level("WARNING", logger="stages.retrieval.topk"):
            assert torch.allclose(topk.block_scores(q, x), expected)
        assert message in caplog.text
        caplog.clear()
    topk.onednn_usable.cache_clear()
