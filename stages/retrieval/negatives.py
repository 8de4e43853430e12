"""Offline hard negatives of composed retrieval: the `mine` stage's table and the `train` stage's reader.

    negatives.parquet   query_id, rank, candidate_id, score: the `mine.k` nearest non-target gallery images"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages.common.errors import StageError
from stages.retrieval.topk import chunked_topk


NEGATIVES_FILE = "negatives.parquet"

NEGATIVES_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("rank", pa.int32()), ("candidate_id", pa.string()), ("score", pa.float32())]
)


def never_negatives(records: list[dict], gallery_ids: list[str], gallery_captions: list[str],
                    by_caption: bool) -> torch.Tensor:
    """Q x m gallery indices (-1 = padding) no query may be given as a negative: its target, its reference image
    and, when the dataset is scored by the caption protocol (`by_caption`), every image whose caption is the
    target's (a correct hit there). Under the other protocols a caption is no answer (CIRR's and uncaptioned Shoes
    images share the empty caption, FashionIQ's the category), so same-caption images stay negatives."""
    position = {image_id: i for i, image_id in enumerate(gallery_ids)}
    with_caption: dict[str, list[int]] = {}
    for i, caption in enumerate(gallery_captions):
        with_caption.setdefault(caption, []).append(i)
    rows = []
    for record in records:
        target = position[record["target_id"]]
        row = {target, *(with_caption[gallery_captions[target]] if by_caption else ())}
        if record["reference_id"] in position:
            row.add(position[record["reference_id"]])
        rows.append(sorted(row))
    width = max(len(row) for row in rows)
    return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long)


def hard_negatives(query_features: torch.Tensor, never: torch.Tensor, gallery_features: torch.Tensor,
                   cfg, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores Q x k, gallery indices Q x k) of the nearest gallery images other than the `never` ones
    (never_negatives); `cfg` is the `mine` section (k, query_chunk, gallery_chunk)."""
    if cfg.k >= gallery_features.shape[0]:
        raise StageError(f"mine.k={cfg.k} must be smaller than the train gallery ({gallery_features.shape[0]} images)")
    scores, indices = chunked_topk(query_features, gallery_features, cfg.k, exclude=never,
                                   query_chunk=cfg.query_chunk, gallery_chunk=cfg.gallery_chunk, device=device)
    short = (indices < 0).any(dim=1).nonzero().flatten()
    if len(short):
        q = int(short[0])
        allowed = gallery_features.shape[0] - int((never[q] >= 0).sum())
        raise StageError(f"mine.k={cfg.k}: query row {q} may be given only {allowed} train gallery images as "
                         f"negatives (its target and reference are excluded, and under the caption protocol the images "
                         f"sharing its target's caption)")
    return scores, indices


def to_table(query_ids: list[str], gallery_ids: list[str], scores: torch.Tensor, indices: torch.Tensor) -> pa.Table:
    k = indices.shape[1]
    return pa.table(
        {
            "query_id": [q for q in query_ids for _ in range(k)],
            "rank": list(range(k)) * len(query_ids),
            "candidate_id": [gallery_ids[i] for i in indices.flatten().tolist()],
            "score": scores.flatten().tolist(),
        },
        schema=NEGATIVES_SCHEMA,
    )


def read_negatives(path: Path) -> dict[str, list[str]]:
    """query_id -> candidate image ids, best first."""
    table = pq.read_table(path).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    negatives: dict[str, list[str]] = {}
    for query_id, candidate_id in zip(table.column("query_id").to_pylist(), table.column("candidate_id").to_pylist()):
        negatives.setdefault(query_id, []).append(candidate_id)
    return negatives
