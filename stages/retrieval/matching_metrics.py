"""Image-text matching (ITM) recall: i2t and t2i R@K, medr, meanr and rsum (COCO 1K x 5, 5K, F30K 1K).

The protocol of VSE++/SCAN/AOQ `evaluation.py` (sunnychencool/AOQ@5bfe620 evaluationAOQ.py), on L2-normalised
embeddings (cosine = dot product):

* i2t (sentence retrieval): each image ranks all captions; its rank is the best rank among its own
  (ground-truth) captions, whatever their number (5 for COCO/F30K, any count >= 1 here).
* t2i (image retrieval): each caption ranks all images; its rank is the rank of its own image.
* R@K = % of queries with rank <= K; medr = floor(median rank) + 1 and meanr = mean rank + 1 with
  0-based ranks, exactly as `evaluation.py` computes them; rsum = sum of R@K over both directions.

Ranks are computed without sorting: the 0-based rank of a query is the number of NEGATIVE
candidates (not its ground truth) whose score is strictly higher than its best positive's score.
Tie rule: a negative scoring exactly as high as the best positive does not count, i.e. ties go in
the positive's favour (`evaluation.py` leaves them to argsort's order). The similarity matrix is
built one (query_chunk x gallery_chunk) block at a time, never whole.

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
) -> Metrics:
    """Both directions' recall on n images (n x d) and m captions (m x d); text_image (m,) is the
    image row of every caption. Every image needs at least one caption (ValueError otherwise).

    Returns {"i2t": {"r<K>": %, ..., "medr", "meanr"}, "t2i": {...}, "rsum": sum of all R@K},
    percentages rounded to 2 decimals.
    """
    return _rounded(_metrics(image_emb, text_emb, text_image, ks, query_chunk, gallery_chunk))


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


def i2t_ranks(image_emb, text_emb, text_image, query_chunk: int = 1024, gallery_chunk: int = 8192) -> torch.Tensor:
    """0-based rank of every image's best caption: the number of other images' captions scoring
    strictly higher than the best of its own captions (ties in the positive's favour). (n,) long."""
    text_image = check_pairing(image_emb, text_emb, text_image)
    n = image_emb.shape[0]
    best = torch.full((n,), float("-inf"), device=text_image.device).scatter_reduce(
        0, text_image, _positive_scores(image_emb, text_emb, text_image), reduce="amax")
    ranks = torch.zeros(n, dtype=torch.long, device=text_image.device)
    for q0 in range(0, n, query_chunk):
        q = image_emb[q0 : q0 + query_chunk].float()
        rows = torch.arange(q0, q0 + q.shape[0], device=text_image.device)
        for g0 in range(0, text_emb.shape[0], gallery_chunk):
            block = q @ text_emb[g0 : g0 + gallery_chunk].float().T
            own = text_image[g0 : g0 + block.shape[1]][None, :] == rows[:, None]
            ranks[q0 : q0 + q.shape[0]] += ((block > best[q0 : q0 + q.shape[0], None]) & ~own).sum(1)
    return ranks.cpu()


def t2i_ranks(image_emb, text_emb, text_image, query_chunk: int = 1024, gallery_chunk: int = 8192) -> torch.Tensor:
    """0-based rank of every caption's image: the number of other images scoring strictly higher
    than its own image (ties in the positive's favour). (m,) long."""
    text_image = check_pairing(image_emb, text_emb, text_image)
    m = text_emb.shape[0]
    positive = _positive_scores(image_emb, text_emb, text_image)
    ranks = torch.zeros(m, dtype=torch.long, device=text_image.device)
    for q0 in range(0, m, query_chunk):
        q = text_emb[q0 : q0 + query_chunk].float()
        own_image = text_image[q0 : q0 + q.shape[0]]
        for g0 in range(0, image_emb.shape[0], gallery_chunk):
            block = q @ image_emb[g0 : g0 + gallery_chunk].float().T
            own = torch.arange(g0, g0 + block.shape[1], device=text_image.device)[None, :] == own_image[:, None]
            ranks[q0 : q0 + q.shape[0]] += ((block > positive[q0 : q0 + q.shape[0], None]) & ~own).sum(1)
    return ranks.cpu()


def rank_statistics(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """{"r<K>": % of ranks < K, "medr": floor(median) + 1, "meanr": mean + 1} from 0-based ranks,
    unrounded (numpy's median: the mean of the two middle values for an even count)."""
    r = ranks.cpu().numpy()
    out = {f"r{k}": 100.0 * float((r < k).mean()) for k in ks}
    out["medr"] = float(math.floor(float(np.median(r))) + 1)
    out["meanr"] = float(r.mean()) + 1.0
    return out


# --------------------------------------------------------------------------------------- helpers


def _metrics(image_emb, text_emb, text_image, ks, query_chunk, gallery_chunk) -> Metrics:
    _check_ks(ks)
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got query_chunk={query_chunk}, gallery_chunk={gallery_chunk}")
    out = {
        "i2t": rank_statistics(i2t_ranks(image_emb, text_emb, text_image, query_chunk, gallery_chunk), ks),
        "t2i": rank_statistics(t2i_ranks(image_emb, text_emb, text_image, query_chunk, gallery_chunk), ks),
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


def _positive_scores(image_emb, text_emb, text_image) -> torch.Tensor:
    """Score of every caption with its own image, (m,) float32."""
    return (image_emb[text_image].float() * text_emb.float()).sum(1)


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(int(k) != k or k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"ks={list(ks)} must be distinct positive integers")


def check_pairing(image_emb, text_emb, text_image) -> torch.Tensor:
    """Validate shapes and the caption -> image map; return text_image as long on the text device."""
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embeddings must be n x d and m x d, "
                         f"got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    n, m = image_emb.shape[0], text_emb.shape[0]
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
