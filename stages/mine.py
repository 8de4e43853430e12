"""Stage `mine`: offline hard-negative candidates over the whole training split, from the pretrained model.

task composed: embeds the train queries (composed) and the train gallery, then keeps for each query the
`mine.k` most similar gallery images that are not its target -> <out>/negatives.parquet.
task matching (AOQ): embeds every train image and caption, then keeps for each image its `mine.aoq_i2t_k` most
similar captions that are not its own and for each caption its `mine.aoq_t2i_k` most similar images other than
its own -> <out>/candidates.npz.

python -m stages.mine --model data/pretrain/model.pt --shards data/shards --out data/mined
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

from stages import shards
from stages.atomic import atomic_path, staged_dir
from stages.cli import StageError, run_stage
from stages.embedding import embed_captions, embed_gallery, embed_queries, load_for_embedding
from stages.offline_candidates import mine_candidates, write_candidates
from stages.params import load, read_task, section
from stages.retrieval import chunked_topk
from stages.training import DeviceName, pick_device

PositiveInt = Annotated[int, Field(gt=0)]
NEGATIVES_FILE, CANDIDATES_FILE = "negatives.parquet", "candidates.npz"
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
    aoq_i2t_k: PositiveInt  # task matching: captions kept per image (AOQ: 2000)
    aoq_t2i_k: PositiveInt  # task matching: images kept per caption (AOQ: 400)


def mine(query_features: torch.Tensor, target_index: torch.Tensor, gallery_features: torch.Tensor,
         cfg: MineConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores Q x k, gallery indices Q x k) of the nearest non-target gallery images."""
    if cfg.k >= gallery_features.shape[0]:
        raise StageError(f"mine.k={cfg.k} must be smaller than the train gallery ({gallery_features.shape[0]} images)")
    return chunked_topk(query_features, gallery_features, cfg.k, exclude=target_index[:, None],
                        query_chunk=cfg.query_chunk, gallery_chunk=cfg.gallery_chunk, device=device)


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
    parser.add_argument("--shards", type=shards.location, required=True, help=shards.LOCATION_HELP)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg = load(MineConfig, "mine")

    began = time.time()
    device = pick_device(cfg.device)
    model, vocab = load_for_embedding(args.model, device)
    if read_task() == "matching":
        return mine_matching(model, vocab, args.shards, args.out, cfg, device, began)
    gallery_ids, _, gallery = embed_gallery(model, args.shards, "train", cfg.batch_size, device)
    records, features = embed_queries(model, vocab, args.shards, "train", cfg.batch_size, device)
    position = {image_id: i for i, image_id in enumerate(gallery_ids)}
    missing = [r["target_id"] for r in records if r["target_id"] not in position]
    if missing:
        raise StageError(f"{args.shards}: train target {missing[0]!r} is not in the train gallery shards")
    targets = torch.tensor([position[r["target_id"]] for r in records])
    scores, indices = mine(features["composed"], targets, gallery, cfg, device)
    with staged_dir(args.out) as work, atomic_path(work / NEGATIVES_FILE) as tmp:
        pq.write_table(to_table([r["query_id"] for r in records], gallery_ids, scores, indices), tmp)
    seconds = time.time() - began
    n = len(records) * cfg.k
    print(f"mine: {n} candidates for {len(records)} queries over {len(gallery_ids)} images in {seconds:.1f} s "
          f"({n / seconds:.0f} candidates/s) -> {args.out / NEGATIVES_FILE}")


def mine_matching(model, tokenizer, shard_dir: Path, out: Path, cfg: MineConfig, device, began: float) -> None:
    image_ids, _, images = embed_gallery(model, shard_dir, "train", cfg.batch_size, device)
    caption_ids, caption_images, texts = embed_captions(model, tokenizer, shard_dir, "train", cfg.batch_size, device)
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    text_image = torch.tensor([row[image_id] for image_id in caption_images])
    i2t, t2i = mine_candidates(images, texts, text_image, cfg.aoq_i2t_k, cfg.aoq_t2i_k, cfg.query_chunk,
                               cfg.gallery_chunk)
    with staged_dir(out) as work:
        write_candidates(work / CANDIDATES_FILE, i2t, t2i, image_ids, caption_ids)
    print(f"mine: AOQ candidates, {cfg.aoq_i2t_k} captions for each of {len(image_ids)} images and "
          f"{cfg.aoq_t2i_k} images for each of {len(caption_ids)} captions in {time.time() - began:.1f} s "
          f"-> {out / CANDIDATES_FILE}")


if __name__ == "__main__":
    run_stage(main)
