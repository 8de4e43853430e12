"""SIAM re-ranking of the dual encoder's top-k against a per-query brute force."""
import torch
import torch.nn.functional as F

from models.matching.siam import SIAM, map_regions
from stages.retrieval.rerank import rerank_t2i


def test_rerank_orders_each_captions_top_k_by_siam_cosine():
    g = torch.Generator().manual_seed(0)
    n, m, d, c, k = 12, 9, 6, 5, 4
    images = F.normalize(torch.randn(n, d, generator=g), dim=1)
    texts = F.normalize(torch.randn(m, d, generator=g), dim=1)
    maps = torch.randn(n, c, 2, 3, generator=g)
    torch.manual_seed(0)
    siam = SIAM(c, c, (2, 3), d).eval()
    text_image = torch.randint(n, (m,), generator=g)

    ranks = []
    for q in range(m):  # brute force: DE top-k by cosine, then SIAM cosine with this caption, one by one
        top = (images @ texts[q]).argsort(descending=True)[:k]
        scores = torch.stack([(siam(map_regions(maps[i:i + 1]), maps[i:i + 1], texts[q:q + 1]) * texts[q]).sum()
                              for i in top.tolist()])
        order = top[scores.argsort(descending=True)].tolist()
        ranks.append(order.index(int(text_image[q])) if int(text_image[q]) in order else k)
    expected = {f"r{kk}": round(100 * sum(r < kk for r in ranks) / m, 2) for kk in (1, 2, 4)}

    assert rerank_t2i(siam, maps, images, texts, text_image, k, [1, 2, 4], query_chunk=4) == expected


def test_rerank_k_must_cover_the_largest_recall():
    import pytest

    with pytest.raises(ValueError, match="evaluate.rerank_k"):
        rerank_t2i(SIAM(2, 2, (1, 1), 2), torch.zeros(3, 2, 1, 1), torch.eye(3, 2), torch.eye(2), torch.tensor([0, 1]),
                   2, [1, 5])
