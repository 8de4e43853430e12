"""Evaluation protocols of composed retrieval, chosen by name, on L2-normalised features (cosine = dot).

`target` (Shoes, CIRR full gallery, shapes): the query's reference image is removed from its ranking;
a hit at K is the exact target image among the top K.

`caption` (TIRG `test_retrieval.test`, used unchanged by GA): reference removed; a hit at K is any of
the top-K images having the target image's caption (CSS3D labels, MIT-States "adj noun", Fashion200k).

`fashioniq_val_union` (VAL `test_val.py`, AMC `test.py` with `gallery_all=False`): per FashionIQ
category, the gallery is the unique reference and target images of that category's queries; reference
removed; exact-target hit; R@10, R@50 per category, their average over categories and the mean of all.

`fashioniq_clip4cir` (CLIP4Cir `validate.py`): per category, the gallery is every image of the
category's split file (gallery caption = category); the reference is not removed; exact-target hit;
reported as `fashioniq_val_union`.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from stages.retrieval.topk import GALLERY_CHUNK, QUERY_CHUNK, chunked_topk, recall_at_k

PROTOCOLS: tuple[str, ...] = ("target", "caption", "fashioniq_val_union", "fashioniq_clip4cir")
FASHIONIQ_KS = [10, 50]


@dataclass
class Ranking:
    """One ranking a protocol makes: the queries `query_rows` (rows of the records) against the gallery rows
    `gallery_rows`. A candidate (a position in gallery_rows) answers a query when its label equals the query's
    label (the exact target: its own position; `caption`: the caption's id); `exclude` is, per query, the candidate
    it may not retrieve (its reference; -1: none), or None when the protocol keeps the reference."""
    category: str | None  # FashionIQ: the category; None for the whole-gallery protocols
    query_rows: torch.Tensor
    gallery_rows: torch.Tensor
    labels: torch.Tensor
    query_labels: torch.Tensor  # -1: the query's target is not among the candidates
    exclude: torch.Tensor | None


def rankings(protocol: str, gallery_ids: list[str], gallery_captions: list[str], records: list[dict]) -> list[Ranking]:
    """The rankings `protocol` makes of these queries: one over the whole gallery (target, caption), or one per
    FashionIQ category in sorted order."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    position = _positions(gallery_ids)
    if protocol in ("target", "caption"):
        everything = torch.arange(len(gallery_ids))
        targets = _gallery_rows(records, "target_id", position)
        # Comparing caption ids instead of image rows turns "exact target" into "same caption as target".
        labels = _caption_ids(gallery_captions) if protocol == "caption" else everything
        return [Ranking(None, torch.arange(len(records)), everything, labels, labels[targets],
                        _gallery_rows(records, "reference_id", position))]
    gallery_of = _union_of_query_images if protocol == "fashioniq_val_union" else _images_captioned_as_category
    out = []
    for category, query_rows in _queries_by_category(records, set(gallery_captions)).items():
        category_records = [records[j] for j in query_rows]
        rows = gallery_of(category, category_records, gallery_captions, position)
        # local[global gallery row] = its row in this category's gallery, -1 when it is not in it
        local = torch.full((len(position),), -1, dtype=torch.long)
        local[rows] = torch.arange(len(rows))
        exclude = local[_gallery_rows(category_records, "reference_id", position)] \
            if protocol == "fashioniq_val_union" else None
        out.append(Ranking(category, torch.tensor(query_rows, dtype=torch.long), rows, torch.arange(len(rows)),
                           local[_gallery_rows(category_records, "target_id", position)], exclude))
    return out


def score(
    protocol: str,
    gallery_ids: list[str],
    gallery_captions: list[str],
    gallery: torch.Tensor,
    records: list[dict],
    queries: torch.Tensor,
    ks: list[int],
    query_chunk: int = QUERY_CHUNK,
    gallery_chunk: int = GALLERY_CHUNK,
    device: torch.device | None = None,
) -> dict:
    """Recall@K in percent (2 decimals) of `queries` (row j described by records[j]) against `gallery`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    _check_inputs(gallery_ids, gallery_captions, gallery, records, queries)
    chunks = {"query_chunk": query_chunk, "gallery_chunk": gallery_chunk, "device": device}
    if protocol in ("target", "caption"):
        _check_ks(ks, len(gallery_ids) - 1, f"the gallery ({len(gallery_ids)} images less each query's reference)")
        (ranking,) = rankings(protocol, gallery_ids, gallery_captions, records)
        recalls = _recalls(ranking, gallery, queries, ks, chunks)
        return {**_in_percent(recalls), "queries": len(records), "gallery": len(gallery_ids)}
    reported = [k for k in FASHIONIQ_KS if k in ks]  # the papers report both; a tiny gallery allows only R@10
    if not reported:
        raise ValueError(f"evaluate.ks: the FashionIQ protocols report R@10 and R@50; add them to {ks}")
    recalls, counts = {}, {}
    for ranking in rankings(protocol, gallery_ids, gallery_captions, records):
        category, size = ranking.category, len(ranking.gallery_rows)
        available = size - 1 if ranking.exclude is not None else size
        _check_ks(reported, available, f"the {category!r} gallery ({size} images"
                                       + (" less each query's reference)" if ranking.exclude is not None else ")"))
        outside = (ranking.query_labels < 0).nonzero().flatten().tolist()
        if outside:
            record = records[int(ranking.query_rows[outside[0]])]
            raise ValueError(f"query {record['query_id']!r}: target_id {record['target_id']!r} is not in the "
                             f"{category!r} gallery ({len(outside)} such queries)")
        recalls[category] = _recalls(ranking, gallery, queries, reported, chunks)
        counts[category] = {"queries": len(ranking.query_rows), "gallery": size}
    return _per_category_table(recalls, counts, reported)


def _recalls(ranking: Ranking, gallery, queries, ks, chunks) -> dict[str, float]:
    """R@K (fractions) of one ranking."""
    exclude = None if ranking.exclude is None else ranking.exclude[:, None]
    _, ranked = chunked_topk(queries[ranking.query_rows], gallery[ranking.gallery_rows], max(ks), exclude=exclude,
                             **chunks)
    return recall_at_k(ranking.labels[ranked], ranking.query_labels, ks)


def _caption_ids(captions: list[str]) -> torch.Tensor:
    """One integer per distinct caption string, so equal captions get equal ids."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(caption, len(ids)) for caption in captions], dtype=torch.long)


# --- FashionIQ: one ranking per category --------------------------------------------------------------


def _queries_by_category(records: list[dict], categories: set[str]) -> dict[str, list[int]]:
    """Category (query_id prefix before the first '-') -> query rows, categories in sorted order."""
    by_category: dict[str, list[int]] = {}
    for row, record in enumerate(records):
        category = record["query_id"].split("-", 1)[0]
        if category not in categories:
            raise ValueError(f"query {record['query_id']!r}: category {category!r} (its query_id prefix) "
                             f"is not the caption of any gallery image ({', '.join(sorted(categories))})")
        by_category.setdefault(category, []).append(row)
    return dict(sorted(by_category.items()))


def _union_of_query_images(category, category_records, gallery_captions, position) -> torch.Tensor:
    references = _gallery_rows(category_records, "reference_id", position)
    targets = _gallery_rows(category_records, "target_id", position)
    return torch.unique(torch.cat([references, targets]))


def _images_captioned_as_category(category, category_records, gallery_captions, position) -> torch.Tensor:
    return torch.tensor([row for row, caption in enumerate(gallery_captions) if caption == category],
                        dtype=torch.long)


def _per_category_table(recalls: dict[str, dict[str, float]], counts: dict[str, dict[str, int]], ks: list[int]) -> dict:
    """Per category, the unweighted average over categories per K, and the mean of all 2*C numbers."""
    keys = [f"r{k}" for k in ks]
    result: dict = {category: {**_in_percent(recalls[category]), **counts[category]} for category in recalls}
    average = {key: statistics.fmean(recalls[c][key] for c in recalls) for key in keys}
    result["average"] = _in_percent(average)
    result["mean"] = round(100 * statistics.fmean(recalls[c][key] for c in recalls for key in keys), 2)
    return result


# --- shared checks and look-ups --------------------------------------------------------------------


def _check_inputs(gallery_ids, gallery_captions, gallery, records, queries) -> None:
    if not (len(gallery_ids) == len(gallery_captions) == gallery.shape[0]):
        raise ValueError(f"{len(gallery_ids)} gallery ids, {len(gallery_captions)} captions and "
                         f"{gallery.shape[0]} gallery rows: they must describe the same images")
    if len(records) != queries.shape[0]:
        raise ValueError(f"{len(records)} query records but {queries.shape[0]} query rows")
    if not records:
        raise ValueError("no queries to score")


def _check_ks(ks: list[int], available: int, where: str) -> None:
    if not ks:
        raise ValueError("evaluate.ks is empty")
    if max(ks) > available:
        raise ValueError(f"evaluate.ks: recall@{max(ks)} needs {max(ks)} candidates, {where} offers {available}")


def _positions(gallery_ids: list[str]) -> dict[str, int]:
    position = {image_id: row for row, image_id in enumerate(gallery_ids)}
    if len(position) != len(gallery_ids):
        raise ValueError("gallery_ids has duplicates: each gallery image must be one row")
    return position


def _gallery_rows(records: list[dict], role: str, position: dict[str, int]) -> torch.Tensor:
    """Gallery row of each record's `role` image (reference_id / target_id)."""
    for record in records:
        if record[role] not in position:
            raise ValueError(f"query {record['query_id']!r}: {role} {record[role]!r} is not in the gallery")
    return torch.tensor([position[record[role]] for record in records], dtype=torch.long)


def _in_percent(recalls: dict[str, float]) -> dict[str, float]:
    return {key: round(100 * value, 2) for key, value in recalls.items()}
