"""Stage `mine`: offline hard-negative candidates for every training query.

Embeds the train queries (composed) and the train gallery with the pretrained model, then keeps
for each query the `mine.k` most similar gallery images that are not its target.

python -m stages.mine --model data/pretrain/model.pt --shards data/shards --out data/mined/negatives.parquet
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field
from typing_extensions import Annotated

from stages.atomic import atomic_path
from stages.cli import StageError, run_stage
from stages.embedding import embed_gallery, embed_queries, load_for_embedding
from stages.params import load, section
from stages.retrieval import chunked_topk
from stages.training import DeviceName, pick_device

PositiveInt = Annotated[int, Field(gt=0)]
NEGATIVES_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("rank", pa.int32()), ("candidate_id", pa.string()), ("score", pa.float32())]
)


@section
class MineConfig:
    k: PositiveInt
    query_chunk: PositiveInt
    gallery_chunk: PositiveInt
    batch_size: PositiveInt
    device: DeviceName


def mine(query_features: torch.Tensor, target_index: torch.Tensor, gallery_features: torch.Tensor,
         cfg: MineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores Q x k, gallery indices Q x k) of the nearest non-target gallery images."""
    if cfg.k >= gallery_features.shape[0]:
        raise StageError(f"mine.k={cfg.k} must be smaller than the train gallery ({gallery_features.shape[0]} images)")
    return chunked_topk(query_features, gallery_features, cfg.k, exclude=target_index[:, None],
                        query_chunk=cfg.query_chunk, gallery_chunk=cfg.gallery_chunk)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg = load(MineConfig, "mine")

    began = time.time()
    device = pick_device(cfg.device)
    model, vocab = load_for_embedding(args.model, device)
    gallery_ids, _, gallery = embed_gallery(model, args.shards, "train", cfg.batch_size, device)
    records, features = embed_queries(model, vocab, args.shards, "train", cfg.batch_size, device)
    position = {image_id: i for i, image_id in enumerate(gallery_ids)}
    missing = [r["target_id"] for r in records if r["target_id"] not in position]
    if missing:
        raise StageError(f"{args.shards}: train target {missing[0]!r} is not in the train gallery shards")
    targets = torch.tensor([position[r["target_id"]] for r in records])
    scores, indices = mine(features["composed"], targets, gallery, cfg)
    with atomic_path(args.out) as tmp:
        pq.write_table(to_table([r["query_id"] for r in records], gallery_ids, scores, indices), tmp)
    seconds = time.time() - began
    n = len(records) * cfg.k
    print(f"mine: {n} candidates for {len(records)} queries over {len(gallery_ids)} images in {seconds:.1f} s "
          f"({n / seconds:.0f} candidates/s) -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
