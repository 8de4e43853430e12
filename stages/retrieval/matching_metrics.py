"""Image-text matching (ITM) recall: i2t and t2i R@K, medr, meanr and rsum (COCO 1K x 5, 5K, F30K 1K).

The protocol of VSE++/SCAN/AOQ `evaluation.py` (sunnychencool/AOQ@5bfe620 evaluationAOQ.py), on L2-normalised
embeddings (cosine = dot product):

* i2t (sentence retrieval): each image ranks all captions; its rank is the best rank among its own
  (ground-truth) captions, whatever their number (5 for COCO/F30K, any count >= 1 here).
* t2i (image retrieval): each caption ranks all images; its rank is the rank of its own image.
* R@K = % of queries with rank <= K; medr = floor(median rank) + 1 and meanr = mean rank + 1 with
  0-based ranks, exactly as `evaluation.py` computes them; rsum = sum of R@K over both directions.

Ranks are computed without sorting: the 0-based rank of a query is the number of NEGATIVE
candidates (not its ground truth) that come before its best positive in the order "score descending,
then `tie_order` ascending". Tie rule: among equal scores the candidates are ordered by a fixed,
seeded random permutation of the gallery (`tie_order`), as a stable argsort of a once-shuffled
gallery would order them. So a model whose embeddings collapse (to one vector, or to zeros) ranks
like a random ranker, i.e. scores chance level, instead of 100% under "ties go to the positive" or
0% under "ties go to the negatives". `evaluation.py`'s `numpy.argsort(d)[::-1]` leaves ties to
numpy's unstable quicksort, an order that is neither defined nor random; for scores without ties
(any working model in float32) every rule gives the same ranks. Non-finite embeddings raise. The
similarity matrix is built one (query_chunk x gallery_chunk) block at a time, never whole, twice
(the positives' scores, then the count), so a positive and its negatives are scored by the same
product.

COCO 5K and Flickr30K 1K are `i2t_t2i` over all test images; COCO 1K is `coco_1k_folds`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

Metrics = dict  # {"i2t": {"r1":..., "medr":..., "meanr":...}, "t2i": {...}, "rsum": float}


def i2t_t2i(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    query_chunk: int = 1024,
    gallery_chunk: int = 8192,
    tie_orders: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Metrics:
    """Both directions' recall on n images (n x d) and m captions (m x d); text_image (m,) is the
    image row of every caption. Every image needs at least one caption (ValueError otherwise).
    tie_orders: (the captions' order, the images' order) among equal scores; default `tie_order`'s.

    Returns {"i2t": {"r<K>": %, ..., "medr", "meanr"}, "t2i": {...}, "rsum": sum of all R@K},
    percentages rounded to 2 decimals.
    """
    return _rounded(_metrics(image_emb, text_emb, text_image, ks, query_chunk, gallery_chunk, tie_orders))


def coco_1k_folds(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor,
    folds: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
    query_chunk: int = 1024,
    gallery_chunk: int = 8192,
) -> dict:
    """COCO 1K x 5: the metrics of each fold (its images and only their captions), and their average.

    folds: image rows per fold (disjoint; see `fold_rows` for folds.json). Returns
    {"folds": [i2t_t2i dict per fold], "average": every metric averaged over the folds}; the
    average's rsum is the rsum of the averaged recalls (= the mean of the folds' rsums). Averages
    are taken before rounding.
    """
    _check_ks(ks)
    n = image_emb.shape[0]
    text_image = check_pairing(image_emb, text_emb, text_image)
    if not folds:
        raise ValueError("coco_1k_folds: no folds given")
    seen: set[int] = set()
    for f, fold in enumerate(folds):
        rows = [int(r) for r in fold]
        if not rows:
            raise ValueError(f"fold {f} has no images")
        bad = [r for r in rows if not 0 <= r < n]
        if bad:
            raise ValueError(f"fold {f}: image row {bad[0]} is outside 0..{n - 1}")
        if len(set(rows)) != len(rows):
            raise ValueError(f"fold {f} lists an image row twice")
        shared = seen.intersection(rows)
        if shared:
            raise ValueError(f"folds must be disjoint: image row {min(shared)} is in fold {f} and an earlier one")
        seen.update(rows)

    per_fold = []
    for fold in folds:
        rows = torch.tensor([int(r) for r in fold], dtype=torch.long, device=text_image.device)
        local = torch.full((n,), -1, dtype=torch.long, device=text_image.device)
        local[rows] = torch.arange(len(rows), device=text_image.device)
        captions = torch.nonzero(local[text_image] >= 0).flatten()
        per_fold.append(_metrics(image_emb[rows], text_emb[captions], local[text_image[captions]],
                                 ks, query_chunk, gallery_chunk))
    average = {
        direction: {key: sum(m[direction][key] for m in per_fold) / len(per_fold) for key in per_fold[0][direction]}
        for direction in ("i2t", "t2i")
    }
    average["rsum"] = _rsum(average, ks)
    return {"folds": [_rounded(m) for m in per_fold], "average": _rounded(average)}


def fold_rows(folds: Mapping[str, Sequence[str]], image_ids: Sequence[str]) -> list[list[int]]:
    """folds.json ({fold: [image_id, ...]}) -> image rows per fold, folds in numeric key order,
    given the image id of every embedding row."""
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    out = []
    for name in sorted(folds, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k))):
        missing = [i for i in folds[name] if i not in row_of]
        if missing:
            raise ValueError(f"fold {name!r}: image_id {missing[0]!r} has no embedding row")
        out.append([row_of[i] for i in folds[name]])
    return out


# ------------------------------------------------------------------------------------------ ranks


TIE_SEED = 0


def tie_order(count: int, seed: int = TIE_SEED) -> torch.Tensor:
    """The place of each of `count` candidates among candidates with the same score (lower first): a
    permutation of 0..count-1 drawn with `seed`. (count,) long."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


def i2t_ranks(image_emb, text_emb, text_image, query_chunk: int = 1024, gallery_chunk: int = 8192,
              order: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of every image's best caption: the number of other images' captions before the
    first of its own in (score descending, `order` ascending); `order` defaults to tie_order(captions).
    (n,) long."""
    text_image = check_pairing(image_emb, text_emb, text_image)
    n, m = image_emb.shape[0], text_emb.shape[0]
    order = _check_order(order, m, text_image.device)
    blocks = lambda: _blocks(image_emb, text_emb, query_chunk, gallery_chunk)  # noqa: E731
    best = torch.full((n,), float("-inf"), device=text_image.device)
    best_order = torch.full((n,), m, dtype=torch.long, device=text_image.device)
    for rows, cols, block in blocks():
        own = text_image[cols][None, :] == rows[:, None]
        _merge_best(best, best_order, rows, block, own, order[cols])
    ranks = torch.zeros(n, dtype=torch.long, device=text_image.device)
    for rows, cols, block in blocks():
        own = text_image[cols][None, :] == rows[:, None]
        ranks[rows] += (_before(block, order[cols], best[rows], best_order[rows]) & ~own).sum(1)
    return ranks.cpu()


def t2i_ranks(image_emb, text_emb, text_image, query_chunk: int = 1024, gallery_chunk: int = 8192,
              order: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of every caption's image: the number of other images before its own in (score
    descending, `order` ascending); `order` defaults to tie_order(images). (m,) long."""
    text_image = check_pairing(image_emb, text_emb, text_image)
    n, m = image_emb.shape[0], text_emb.shape[0]
    order = _check_order(order, n, text_image.device)
    blocks = lambda: _blocks(text_emb, image_emb, query_chunk, gallery_chunk)  # noqa: E731
    positive = torch.full((m,), float("-inf"), device=text_image.device)
    for rows, cols, block in blocks():
        own = cols[None, :] == text_image[rows][:, None]
        positive[rows] = torch.maximum(positive[rows], block.masked_fill(~own, float("-inf")).amax(1))
    ranks = torch.zeros(m, dtype=torch.long, device=text_image.device)
    for rows, cols, block in blocks():
        own = cols[None, :] == text_image[rows][:, None]
        ranks[rows] += (_before(block, order[cols], positive[rows], order[text_image[rows]]) & ~own).sum(1)
    return ranks.cpu()


def _blocks(queries, gallery, query_chunk, gallery_chunk):
    """(query rows, gallery rows, float32 scores) for every (query_chunk x gallery_chunk) block."""
    device = gallery.device
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk].float()
        rows = torch.arange(q0, q0 + q.shape[0], device=device)
        for g0 in range(0, gallery.shape[0], gallery_chunk):
            g = gallery[g0 : g0 + gallery_chunk].float()
            yield rows, torch.arange(g0, g0 + g.shape[0], device=device), q @ g.T


def _merge_best(best, best_order, rows, block, own, cols_order) -> None:
    """Fold a block's own captions into each query's first own caption (highest score, then lowest order)."""
    top = block.masked_fill(~own, float("-inf")).amax(1)
    at_top = own & (block == top[:, None])
    top_order = torch.where(at_top, cols_order[None, :], torch.iinfo(torch.long).max).amin(1)
    better = (top > best[rows]) | ((top == best[rows]) & (top_order < best_order[rows]))
    best[rows] = torch.where(better, top, best[rows])
    best_order[rows] = torch.where(better, top_order, best_order[rows])


def _before(block, cols_order, score, score_order) -> torch.Tensor:
    """Which candidates come before a positive of (score, order): higher score, or equal and lower order."""
    return (block > score[:, None]) | ((block == score[:, None]) & (cols_order[None, :] < score_order[:, None]))


def _check_order(order, count: int, device) -> torch.Tensor:
    if order is None:
        return tie_order(count).to(device)
    order = torch.as_tensor(order).to(device=device, dtype=torch.long)
    if order.shape != (count,) or not torch.equal(torch.sort(order).values, torch.arange(count, device=device)):
        raise ValueError(f"order must be a permutation of 0..{count - 1}")
    return order


def rank_statistics(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """{"r<K>": % of ranks < K, "medr": floor(median) + 1, "meanr": mean + 1} from 0-based ranks,
    unrounded (numpy's median: the mean of the two middle values for an even count)."""
    r = ranks.cpu().numpy()
    out = {f"r{k}": 100.0 * float((r < k).mean()) for k in ks}
    out["medr"] = float(math.floor(float(np.median(r))) + 1)
    out["meanr"] = float(r.mean()) + 1.0
    return out


# --------------------------------------------------------------------------------------- helpers


def _metrics(image_emb, text_emb, text_image, ks, query_chunk, gallery_chunk, tie_orders=None) -> Metrics:
    _check_ks(ks)
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got query_chunk={query_chunk}, gallery_chunk={gallery_chunk}")
    caption_order, image_order = tie_orders if tie_orders is not None else (None, None)
    out = {
        "i2t": rank_statistics(i2t_ranks(image_emb, text_emb, text_image, query_chunk, gallery_chunk, caption_order), ks),
        "t2i": rank_statistics(t2i_ranks(image_emb, text_emb, text_image, query_chunk, gallery_chunk, image_order), ks),
    }
    out["rsum"] = _rsum(out, ks)
    return out


def _rsum(metrics: Mapping, ks: Sequence[int]) -> float:
    return sum(metrics[d][f"r{k}"] for d in ("i2t", "t2i") for k in ks)


def _rounded(metrics: Mapping) -> Metrics:
    return {
        "i2t": {key: round(value, 2) for key, value in metrics["i2t"].items()},
        "t2i": {key: round(value, 2) for key, value in metrics["t2i"].items()},
        "rsum": round(metrics["rsum"], 2),
    }


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(int(k) != k or k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"ks={list(ks)} must be distinct positive integers")


def check_pairing(image_emb, text_emb, text_image) -> torch.Tensor:
    """Validate shapes and the caption -> image map; return text_image as long on the text device."""
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embeddings must be n x d and m x d, "
                         f"got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    n, m = image_emb.shape[0], text_emb.shape[0]
    for name, emb in (("image", image_emb), ("caption", text_emb)):
        if not bool(torch.isfinite(emb).all()):
            bad = int(torch.nonzero(~torch.isfinite(emb).all(1))[0])
            raise ValueError(f"{name} embedding row {bad} is not finite (NaN or inf): the model is broken")
    if n == 0 or m == 0:
        raise ValueError(f"need at least one image and one caption, got {n} images and {m} captions")
    text_image = torch.as_tensor(text_image).to(device=text_emb.device)
    if text_image.shape != (m,) or text_image.dtype.is_floating_point or text_image.dtype == torch.bool:
        raise ValueError(f"text_image must be an integer tensor of shape ({m},), "
                         f"got {text_image.dtype} {tuple(text_image.shape)}")
    text_image = text_image.long()
    if int(text_image.min()) < 0 or int(text_image.max()) >= n:
        raise ValueError(f"text_image has image rows outside 0..{n - 1}")
    counts = torch.bincount(text_image, minlength=n)
    if bool((counts == 0).any()):
        first = int(torch.nonzero(counts == 0)[0])
        raise ValueError(f"image row {first} has no caption ({int((counts == 0).sum())} images without captions)")
    return text_image
