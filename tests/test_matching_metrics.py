import math

import numpy as np
import pytest
import torch

from stages.retrieval.matching_metrics import coco_1k_folds, fold_rows, i2t_ranks, i2t_t2i, t2i_ranks, tie_order

# Hand-built case: 3 images on the axes of R^3, so score(image j, caption c) = C[c, j] exactly
# (dyadic values, no rounding). Captions 0-4 belong to image 0, 5-9 to image 1, 10-14 to image 2.
# Ties are ordered by INDEX_ORDER here (the lower row first), so they can be worked out by hand.
C = torch.tensor(
    [
        # img0  img1  img2      t2i rank (0-based) = other images before its own
        [0.50, 1.00, 0.00],  # own 0: img1 higher                      -> 1
        [0.25, 0.00, 0.00],  # own 0                                    -> 0
        [0.00, 0.00, 1.00],  # own 0: img2 higher                      -> 1
        [0.00, 0.50, 0.50],  # own 0: img1, img2 higher                -> 2
        [0.50, 0.00, 0.00],  # own 0                                    -> 0
        [1.00, 1.00, 0.00],  # own 1: img0 ties, lower row: before      -> 1
        [0.75, 0.50, 0.00],  # own 1: img0 higher                      -> 1
        [0.75, 0.25, 1.00],  # own 1: img0, img2 higher                -> 2
        [1.00, 0.00, 0.00],  # own 1: img0 higher                      -> 1
        [0.00, 0.50, 0.75],  # own 1: img2 higher                      -> 1
        [0.75, 0.00, 0.75],  # own 2: img0 ties, before                 -> 1
        [1.00, 0.00, 0.50],  # own 2: img0 higher                      -> 1
        [0.00, 0.00, 0.00],  # own 2: all tie, img0 and img1 before     -> 2
        [0.00, 0.25, 0.50],  # own 2                                    -> 0
        [0.25, 0.00, 0.25],  # own 2: img0 ties, before                 -> 1
    ]
)
IMAGES = torch.eye(3)
TEXT_IMAGE = torch.arange(3).repeat_interleave(5)
INDEX_ORDER = (torch.arange(15), torch.arange(3))  # (captions, images)
# i2t (column j, the first own caption vs the other images' captions):
#   img0: own best 0.5 (row 0); others above 0.5: rows 5,6,7,8,10,11           -> rank 6
#   img1: own best 1.0 (row 5); row 0 ties at 1.0 and is a lower row            -> rank 1
#   img2: own best 0.75 (row 10); above: rows 2,7; row 9 ties and is lower       -> rank 3
# i2t ranks [6,1,3]: R@1 0/3, R@5 2/3, R@10 3/3; medr floor(3)+1 = 4; meanr 10/3+1 = 4.33
# t2i ranks: three 0s, nine 1s, three 2s: R@1 3/15 = 20, R@5 = R@10 = 100;
#   medr = floor(median = 1)+1 = 2; meanr = (9*1 + 3*2)/15 + 1 = 2.0
# rsum = 0 + 66.67 + 100 + 20 + 100 + 100 = 386.67


def test_five_captions_per_image_by_hand():
    assert i2t_ranks(IMAGES, C, TEXT_IMAGE, order=INDEX_ORDER[0]).tolist() == [6, 1, 3]
    assert t2i_ranks(IMAGES, C, TEXT_IMAGE, order=INDEX_ORDER[1]).tolist() == [
        1, 0, 1, 2, 0, 1, 1, 2, 1, 1, 1, 1, 2, 0, 1]
    assert i2t_t2i(IMAGES, C, TEXT_IMAGE, tie_orders=INDEX_ORDER) == {
        "i2t": {"r1": 0.0, "r5": 66.67, "r10": 100.0, "medr": 4.0, "meanr": 4.33},
        "t2i": {"r1": 20.0, "r5": 100.0, "r10": 100.0, "medr": 2.0, "meanr": 2.0},
        "rsum": 386.67,
    }


@pytest.mark.parametrize("query_chunk,gallery_chunk", [(1, 1), (2, 4), (7, 3)])
def test_chunking_does_not_change_the_hand_case(query_chunk, gallery_chunk):
    for orders in (INDEX_ORDER, None):
        assert i2t_t2i(IMAGES, C, TEXT_IMAGE, query_chunk=query_chunk, gallery_chunk=gallery_chunk,
                       tie_orders=orders) == i2t_t2i(IMAGES, C, TEXT_IMAGE, tie_orders=orders)


# 2 images on the axes of R^2; image 0 has 2 captions, image 1 has 3, interleaved; no positive ties a negative.
C23 = torch.tensor([[0.25, 0.5], [1.0, 0.25], [0.75, 0.5], [0.5, 0.75], [0.25, 0.0]])
TEXT_IMAGE23 = torch.tensor([1, 0, 1, 0, 1])
# i2t img0: own c1 1.0, c3 0.5 -> best 1.0; others 0.25, 0.75, 0.25 below  -> rank 0
#     img1: own c0 0.5, c2 0.5, c4 0 -> best 0.5; others c1 0.25, c3 0.75 -> rank 1
#     ranks [0,1]: R@1 50, R@2 100; medr floor(median 0.5)+1 = 1; meanr 0.5+1 = 1.5
# t2i c0 own1 0.5 vs img0 0.25 -> 0; c1 own0 -> 0; c2 own1 0.5 < 0.75 -> 1; c3 own0 0.5 < 0.75 -> 1;
#     c4 own1 0 < 0.25 -> 1; ranks [0,0,1,1,1]: R@1 40, R@2 100; medr 1+1 = 2; meanr 3/5+1 = 1.6
FOLD0 = {"i2t": {"r1": 50.0, "r2": 100.0, "medr": 1.0, "meanr": 1.5},
         "t2i": {"r1": 40.0, "r2": 100.0, "medr": 2.0, "meanr": 1.6}, "rsum": 290.0}


def test_two_and_three_captions_per_image_by_hand():
    assert i2t_ranks(torch.eye(2), C23, TEXT_IMAGE23).tolist() == [0, 1]
    assert t2i_ranks(torch.eye(2), C23, TEXT_IMAGE23).tolist() == [0, 0, 1, 1, 1]
    assert i2t_t2i(torch.eye(2), C23, TEXT_IMAGE23, ks=(1, 2), query_chunk=2, gallery_chunk=2) == FOLD0


def test_fold_average_by_hand():
    # fold 0 = the 2/3-caption case on dims 0,1 (images 0,1); fold 1 on dims 2,3 (images 2,3, listed
    # as [3, 2]). Cross-fold scores are made large (1.0): they must not enter a fold's metrics.
    images = torch.eye(4)
    text = torch.cat([torch.cat([C23, torch.ones(5, 2)], 1),
                      torch.tensor([[1.0, 1.0, 0.25, 0.5], [1.0, 1.0, 0.0, 1.0]])])
    text_image = torch.cat([TEXT_IMAGE23, torch.tensor([2, 3])])
    # fold 1: i2t img2 own 0.25 vs c6's 0 -> 0; img3 own 1.0 vs 0.5 -> 0: R@1 100, R@2 100, medr 1, meanr 1
    #         t2i c5 own 0.25 < img3 0.5 -> 1; c6 -> 0: R@1 50, R@2 100, medr floor(0.5)+1 = 1, meanr 1.5
    fold1 = {"i2t": {"r1": 100.0, "r2": 100.0, "medr": 1.0, "meanr": 1.0},
             "t2i": {"r1": 50.0, "r2": 100.0, "medr": 1.0, "meanr": 1.5}, "rsum": 350.0}
    out = coco_1k_folds(images, text, text_image, [[0, 1], [3, 2]], ks=(1, 2), query_chunk=1, gallery_chunk=3)
    assert out["folds"] == [FOLD0, fold1]
    assert out["average"] == {"i2t": {"r1": 75.0, "r2": 100.0, "medr": 1.0, "meanr": 1.25},
                              "t2i": {"r1": 45.0, "r2": 100.0, "medr": 1.5, "meanr": 1.55}, "rsum": 320.0}
    # all 4 images at once (the "5K" way) sees the cross-fold scores
    assert i2t_t2i(images, text, text_image, ks=(1, 2))["rsum"] < 320.0


def _vse_ranks(images: np.ndarray, texts: np.ndarray, text_image: np.ndarray):
    """evaluation.py's i2t/t2i ranks: full matrix, argsort, best rank among the GT captions."""
    scores = images @ texts.T
    i2t = []
    for i in range(len(images)):
        order = np.argsort(scores[i])[::-1]
        i2t.append(min(np.where(order == c)[0][0] for c in np.where(text_image == i)[0]))
    t2i = [np.where(np.argsort(scores[:, c])[::-1] == text_image[c])[0][0] for c in range(len(texts))]
    return i2t, t2i


@pytest.mark.parametrize("query_chunk,gallery_chunk", [(3, 5), (1000, 1000), (1, 2)])
def test_ranks_match_full_matrix_argsort(query_chunk, gallery_chunk):
    g = torch.Generator().manual_seed(0)
    n = 17
    text_image = torch.cat([torch.arange(n), torch.randint(0, n, (30,), generator=g)])  # 1..several each
    text_image = text_image[torch.randperm(len(text_image), generator=g)]
    images = torch.nn.functional.normalize(torch.randn(n, 6, generator=g), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(len(text_image), 6, generator=g), dim=1)
    i2t, t2i = _vse_ranks(images.double().numpy(), texts.double().numpy(), text_image.numpy())
    assert i2t_ranks(images, texts, text_image, query_chunk, gallery_chunk).tolist() == i2t
    assert t2i_ranks(images, texts, text_image, query_chunk, gallery_chunk).tolist() == t2i
    out = i2t_t2i(images, texts, text_image, ks=(1, 5, 10), query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    assert out["i2t"]["r5"] == round(100 * float(np.mean(np.array(i2t) < 5)), 2)
    assert out["t2i"]["medr"] == np.floor(np.median(t2i)) + 1
    assert out["t2i"]["meanr"] == round(float(np.mean(t2i)) + 1, 2)


def test_image_without_captions_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="image row 1 has no caption"):
        i2t_t2i(torch.eye(3), torch.eye(3), torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="outside"):
        i2t_t2i(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        i2t_t2i(torch.eye(2), torch.eye(2), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="ks"):
        i2t_t2i(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), ks=(0, 1))
    with pytest.raises(ValueError, match="disjoint"):
        coco_1k_folds(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), [[0, 1], [1]])
    with pytest.raises(ValueError, match="fold 1 has no images"):
        coco_1k_folds(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), [[0, 1], []])


def test_fold_rows_from_folds_json():
    folds = {"1": ["c"], "0": ["b", "a"], "10": ["d"]}
    assert fold_rows(folds, ["a", "b", "c", "d"]) == [[1, 0], [2], [3]]
    with pytest.raises(ValueError, match="'x' has no embedding row"):
        fold_rows({"0": ["x"]}, ["a"])


# ------------------------------------------------------------------ broken models and ties

def _coco_layout(n):
    return torch.arange(n).repeat_interleave(5)  # caption r belongs to image r // 5


def _i2t_chance(n, k):
    """A random ranker's i2t R@k (%) with 5 own captions among 5n: 1 - C(5n-5, k) / C(5n, k)."""
    return 100.0 * (1.0 - math.comb(5 * n - 5, k) / math.comb(5 * n, k))


@pytest.mark.parametrize("embedding", ["constant", "zeros"])
def test_collapsed_model_scores_chance(embedding):
    n, d = 1000, 8
    text_image = _coco_layout(n)
    if embedding == "constant":
        vector = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(3)), dim=0)
        images, texts = vector.expand(n, d).clone(), vector.expand(5 * n, d).clone()
    else:  # zero vectors stay zero under L2 normalisation (F.normalize divides by max(norm, eps))
        images, texts = torch.zeros(n, d), torch.zeros(5 * n, d)
    out = i2t_t2i(images, texts, text_image, ks=(1, 5, 10, 50), query_chunk=300, gallery_chunk=700)
    for k in (1, 5, 10, 50):
        # t2i: a random ranker puts a caption's one image in the top k with probability k / n
        p = k / n
        assert abs(out["t2i"][f"r{k}"] - 100 * p) <= 100 * 4 * math.sqrt(p * (1 - p) / (5 * n)) + 0.01, (k, out)
        p = _i2t_chance(n, k) / 100
        assert abs(out["i2t"][f"r{k}"] - 100 * p) <= 100 * 4 * math.sqrt(p * (1 - p) / n) + 0.01, (k, out)
    assert out["rsum"] < 20  # chance: about 0.1 + 0.5 + 1 + 5 in each direction, 13.2 of 800 (the old rule gave 800)


def _ranks_by_full_sort(images, texts, text_image, caption_order, image_order):
    """Independent reference: each query's full score row, sorted by (score descending, order ascending)
    with numpy's lexsort; the 0-based rank is the count of negatives before the first positive."""
    scores = images @ texts.T
    i2t = []
    for i in range(len(images)):
        ranked = np.lexsort((caption_order, -scores[i]))
        own = text_image[ranked] == i
        i2t.append(int(np.argmax(own)))  # the negatives before the first own caption
    t2i = []
    for c in range(len(texts)):
        ranked = np.lexsort((image_order, -scores[:, c]))
        t2i.append(int(np.nonzero(ranked == text_image[c])[0][0]))
    return i2t, t2i


@pytest.mark.parametrize("query_chunk,gallery_chunk", [(1000, 1000), (3, 4), (1, 1)])
@pytest.mark.parametrize("orders", ["default", "index"])
def test_ties_rank_like_a_full_sort(query_chunk, gallery_chunk, orders):
    g = torch.Generator().manual_seed(1)
    n = 12
    text_image = torch.cat([_coco_layout(n), torch.randint(0, n, (7,), generator=g)])
    # entries in {0, 0.5, 1}, 3 dims: dot products are exact, and many images and captions coincide
    images = torch.randint(0, 3, (n, 3), generator=g).float() / 2
    texts = torch.randint(0, 3, (len(text_image), 3), generator=g).float() / 2
    scores = images @ texts.T
    assert len(torch.unique(scores)) < scores.numel() / 5  # the case is full of ties
    if orders == "index":
        caption_order, image_order = torch.arange(len(texts)), torch.arange(n)
        kwargs = {"order": caption_order}, {"order": image_order}
    else:
        caption_order, image_order = tie_order(len(texts)), tie_order(n)
        kwargs = {}, {}
    i2t, t2i = _ranks_by_full_sort(images.double().numpy(), texts.double().numpy(), text_image.numpy(),
                                   caption_order.numpy(), image_order.numpy())
    assert i2t_ranks(images, texts, text_image, query_chunk, gallery_chunk, **kwargs[0]).tolist() == i2t
    assert t2i_ranks(images, texts, text_image, query_chunk, gallery_chunk, **kwargs[1]).tolist() == t2i
    # with random embeddings (no ties) the reference agrees with evaluation.py's argsort ranks too
    images = torch.nn.functional.normalize(torch.randn(n, 6, generator=g), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(len(text_image), 6, generator=g), dim=1)
    assert _ranks_by_full_sort(images.double().numpy(), texts.double().numpy(), text_image.numpy(),
                               caption_order.numpy(), image_order.numpy()) == _vse_ranks(
        images.double().numpy(), texts.double().numpy(), text_image.numpy())


def test_non_finite_embeddings_and_bad_orders_raise():
    images = torch.eye(3)
    images[1, 0] = float("nan")
    with pytest.raises(ValueError, match="image embedding row 1 is not finite"):
        i2t_t2i(images, torch.eye(3), torch.arange(3))
    with pytest.raises(ValueError, match="caption embedding row 2 is not finite"):
        i2t_t2i(torch.eye(3), torch.eye(3) / torch.tensor([1.0, 1.0, 0.0])[:, None], torch.arange(3))
    with pytest.raises(ValueError, match="permutation"):
        t2i_ranks(torch.eye(3), torch.eye(3), torch.arange(3), order=torch.tensor([0, 0, 1]))
