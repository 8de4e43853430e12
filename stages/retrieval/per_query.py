"""Per-query results of an evaluation: the rank of each query's first correct answer and its top-k, written by
`evaluate --per-query` (one Parquet per split) and read by stages.search --failures and stages.app.

Ranks are 1-based and count strictly higher scores only: a query's rank is 1 + the number of candidates scoring
strictly more than its best correct candidate, so a wrong candidate tied with the correct one does not push it down
(the optimistic reading; evaluate's recall orders equal scores by gallery row, and the matching metrics by a fixed
random order, so on exact ties a rank here can be better than theirs). A query with no correct candidate left (its
target excluded as its own reference) has no rank (null). Top-k lists are best first, equal scores by row.

Composed retrieval, one row per query and protocol (`protocol`): query_id, reference_id, target_id, text,
protocol, target_rank, candidates (the gallery the protocol ranks, less the excluded reference), top_ids,
top_scores. The gallery and its exclusions are the protocol's (stages.retrieval.protocols.rankings): the FashionIQ
protocols rank within the query's category gallery.

Image-text matching, one row per query and direction (`direction`): t2i, a caption ranking the images (query_id
= caption_id, image_id = its image, text = the caption; target_rank = its image's rank; top_ids = image ids), and
i2t, an image ranking the captions (query_id = image_id = the image, text null; target_rank = the best rank of its
own captions; top_ids = caption ids).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages.common.errors import StageError
from stages.retrieval.protocols import rankings
from stages.retrieval.topk import QUERY_CHUNK, block_scores

COMPOSED_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("reference_id", pa.string()), ("target_id", pa.string()), ("text", pa.string()),
    ("protocol", pa.string()), ("target_rank", pa.int32()), ("candidates", pa.int32()),
    ("top_ids", pa.list_(pa.string())), ("top_scores", pa.list_(pa.float32())),
])
MATCHING_SCHEMA = pa.schema([
    ("direction", pa.string()), ("query_id", pa.string()), ("image_id", pa.string()), ("text", pa.string()),
    ("target_rank", pa.int32()), ("candidates", pa.int32()),
    ("top_ids", pa.list_(pa.string())), ("top_scores", pa.list_(pa.float32())),
])
SKIPPED_FILE = "skipped.json"


@torch.no_grad()
def ranks_and_top(queries: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, query_labels: torch.Tensor,
                  k: int, exclude: torch.Tensor | None = None, query_chunk: int = QUERY_CHUNK):
    """For each query row (unit vectors, cosine = dot): the 1-based rank of its best candidate whose label equals
    the query's label (None when it has none), counting strictly higher scores only, and its top-k candidate rows
    and scores (best first, ties by row). exclude: per query a candidate row it may not retrieve (-1: none).
    Returns (ranks, top rows, top scores), lists with one entry per query."""
    ranks, top_rows, top_scores = [], [], []
    width = min(k, candidates.shape[0])
    candidates = candidates.float()
    for q0 in range(0, queries.shape[0], query_chunk):
        block = block_scores(queries[q0:q0 + query_chunk].float(), candidates)
        rows = torch.arange(block.shape[0])
        if exclude is not None:
            excluded = exclude[q0:q0 + query_chunk]
            keep = excluded >= 0
            block[rows[keep], excluded[keep]] = float("-inf")
        correct = (labels[None, :] == query_labels[q0:q0 + query_chunk, None]) & torch.isfinite(block)
        best = torch.where(correct, block, torch.tensor(float("-inf"))).amax(dim=1)
        above = (block > best[:, None]).sum(dim=1) + 1
        ranks += [int(r) if torch.isfinite(b) else None for r, b in zip(above, best)]
        scores, order = _top_by_score_then_row(block, width)
        for row_scores, row_order in zip(scores.tolist(), order.tolist()):
            kept = [i for i, s in enumerate(row_scores) if s != float("-inf")]
            top_rows.append([row_order[i] for i in kept])
            top_scores.append([row_scores[i] for i in kept])
    return ranks, top_rows, top_scores


def _top_by_score_then_row(block: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, columns) R x width of each row's `width` best columns, best first, equal scores by column (the lowest
    columns among those tied at the last place kept): every score above the width-th best, then the first columns
    equal to it, then a stable sort by score. Linear in the block, unlike a full sort."""
    last = torch.topk(block, width, dim=1).values[:, -1:]
    above = block > last
    equal = block == last
    keep = above | (equal & (equal.cumsum(dim=1) <= width - above.sum(dim=1, keepdim=True)))
    columns = keep.nonzero()[:, 1].view(block.shape[0], width)  # row-major: each row's columns in order
    scores, order = block.gather(1, columns).sort(dim=1, descending=True, stable=True)
    return scores, columns.gather(1, order)


def composed_rows(protocol: str, gallery_ids: list[str], gallery_captions: list[str], gallery: torch.Tensor,
                  records: list[dict], queries: torch.Tensor, k: int, query_chunk: int = QUERY_CHUNK) -> list[dict]:
    """One row per query (COMPOSED_SCHEMA) under `protocol`, in the records' order."""
    out: list[dict | None] = [None] * len(records)
    for ranking in rankings(protocol, gallery_ids, gallery_captions, records):
        ranks, tops, scores = ranks_and_top(queries[ranking.query_rows], gallery[ranking.gallery_rows],
                                            ranking.labels, ranking.query_labels, k, ranking.exclude, query_chunk)
        size = len(ranking.gallery_rows)
        for j, row in enumerate(ranking.query_rows.tolist()):
            record = records[row]
            excluded = ranking.exclude is not None and int(ranking.exclude[j]) >= 0
            out[row] = {**{key: record[key] for key in ("query_id", "reference_id", "target_id", "text")},
                        "protocol": protocol, "target_rank": ranks[j], "candidates": size - excluded,
                        "top_ids": [gallery_ids[int(ranking.gallery_rows[i])] for i in tops[j]],
                        "top_scores": scores[j]}
    return out


def matching_rows(image_ids: list[str], images: torch.Tensor, caption_ids: list[str], caption_texts: list[str],
                  texts: torch.Tensor, text_image: torch.Tensor, k: int, query_chunk: int = QUERY_CHUNK) -> list[dict]:
    """t2i rows (one per caption), then i2t rows (one per image) (MATCHING_SCHEMA). text_image: the image row of
    every caption."""
    out = []
    image_rows = torch.arange(len(image_ids))
    ranks, tops, scores = ranks_and_top(texts, images, image_rows, text_image, k, query_chunk=query_chunk)
    for j, caption_id in enumerate(caption_ids):
        out.append({"direction": "t2i", "query_id": caption_id, "image_id": image_ids[int(text_image[j])],
                    "text": caption_texts[j], "target_rank": ranks[j], "candidates": len(image_ids),
                    "top_ids": [image_ids[i] for i in tops[j]], "top_scores": scores[j]})
    ranks, tops, scores = ranks_and_top(images, texts, text_image, image_rows, k, query_chunk=query_chunk)
    for i, image_id in enumerate(image_ids):
        out.append({"direction": "i2t", "query_id": image_id, "image_id": image_id, "text": None,
                    "target_rank": ranks[i], "candidates": len(caption_ids),
                    "top_ids": [caption_ids[c] for c in tops[i]], "top_scores": scores[i]})
    return out


def write_split(folder: Path, split: str, rows: list[dict], task: str) -> Path:
    """`<folder>/<split>.parquet` of one split's rows."""
    path = Path(folder) / f"{split}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=COMPOSED_SCHEMA if task == "composed" else MATCHING_SCHEMA),
                   path)
    return path


def write_skipped(folder: Path, reason: str) -> None:
    (Path(folder) / SKIPPED_FILE).write_text(json.dumps({"skipped": reason}) + "\n")


def read_split(folder: Path, split: str) -> list[dict]:
    """The rows `evaluate --per-query` wrote for one split; a missing file is a StageError saying why."""
    path = Path(folder) / f"{split}.parquet"
    if not path.is_file():
        skipped = Path(folder) / SKIPPED_FILE
        why = json.loads(skipped.read_text())["skipped"] if skipped.is_file() else "no such file"
        raise StageError(f"{path}: no per-query results for split {split!r} ({why}; `evaluate` writes them when "
                         f"evaluate.per_query_k > 0, for the splits it scores)")
    return pq.read_table(path).to_pylist()


def worst_first(rows: list[dict], key: str, value: str | None) -> list[dict]:
    """The rows whose `key` (protocol or direction) is `value` (None: the first one the rows name), worst target
    rank first (no rank counts as the worst; equal ranks in file order)."""
    if not rows:
        return []
    value = rows[0][key] if value is None else value
    chosen = [row for row in rows if row[key] == value]
    if not chosen:
        raise StageError(f"no per-query rows with {key} {value!r} (they have "
                         f"{', '.join(sorted({row[key] for row in rows}))})")
    return sorted(chosen, key=lambda row: -(row["target_rank"] if row["target_rank"] is not None else 2**31))
