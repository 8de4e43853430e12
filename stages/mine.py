"""Stage `mine`: offline hard-negative candidates over the whole training split, from the pretrained model.

task composed: embeds the train queries (composed) and the train gallery, then keeps for each query the
`mine.k` most similar gallery images that are neither its target, nor its reference, nor an image with the target's
caption (a correct answer under the caption protocol) -> <out>/negatives.parquet.
task matching (AOQ): embeds every train image and caption, then keeps for each image its `mine.aoq_i2t_k` most
similar captions that are not its own and for each caption its `mine.aoq_t2i_k` most similar images other than
its own -> <out>/candidates.npz.
With `train.offline_negatives: false` nothing reads them: the stage mines nothing and writes <out>/skipped.json
saying so (DVC re-runs it when the flag changes, so `train` never meets a stale or missing file).

python -m stages.mine --model data/pretrain/model.pt --shards data/shards --out data/mined
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from pydantic import Field
from typing_extensions import Annotated

from stages.shards import store
from stages.common.atomic import atomic_path, staged_dir, write_json
from stages.common.errors import StageError, run_stage
from stages.retrieval.embedding import embed_captions, embed_gallery, embed_queries, load_for_embedding
from stages.retrieval.negatives import NEGATIVES_FILE, hard_negatives, never_negatives, to_table
from stages.retrieval.offline_candidates import CANDIDATES_FILE, mine_candidates, write_candidates
from stages.common.params import load, read_task, read_yaml, section
from stages.common.device import DeviceName, pick_device
from stages.common.cli import stage_parser
from stages.common.validation import check_from

PositiveInt = Annotated[int, Field(gt=0)]
SKIPPED_FILE = "skipped.json"


@section
class MineConfig:
    k: PositiveInt
    query_chunk: PositiveInt
    gallery_chunk: PositiveInt
    batch_size: PositiveInt
    device: DeviceName
    aoq_i2t_k: PositiveInt  # task matching: captions kept per image (AOQ: 2000)
    aoq_t2i_k: PositiveInt  # task matching: images kept per caption (AOQ: 400)


def check_params(path, declared: dict | None = None) -> None:
    load(MineConfig, "mine", path)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "python -m stages.mine --model data/pretrain/model.pt --shards data/shards "
                          "--out data/mined", "output directory: negatives.parquet (task matching: candidates.npz)")
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint that embeds, e.g. the pretrained one")
    parser.add_argument("--shards", type=store.location, required=True, help=store.LOCATION_HELP)
    args = parser.parse_args(argv)
    declared = store.read_evaluation(args.shards)
    check_from("mine", args.params, declared)
    cfg = load(MineConfig, "mine", args.params)
    if not read_yaml(args.params).get("train", {}).get("offline_negatives", True):
        with staged_dir(args.out) as work:
            write_json(work / SKIPPED_FILE, {"mined": False, "reason": "train.offline_negatives is false"})
        print(f"mine: nothing to mine (train.offline_negatives is false) -> {args.out / SKIPPED_FILE}")
        return

    began = time.time()
    device = pick_device(cfg.device)
    model, vocab = load_for_embedding(args.model, device)
    if read_task(args.params, declared) == "matching":
        return mine_matching(model, vocab, args.shards, args.out, cfg, device, began)
    gallery_ids, gallery_captions, gallery = embed_gallery(model, args.shards, "train", cfg.batch_size, device)
    records, features = embed_queries(model, vocab, args.shards, "train", cfg.batch_size, device)
    position = {image_id: i for i, image_id in enumerate(gallery_ids)}
    missing = [r["target_id"] for r in records if r["target_id"] not in position]
    if missing:
        raise StageError(f"{args.shards}: train target {missing[0]!r} is not in the train gallery shards")
    by_caption = "caption" in ((declared or {}).get("protocols") or ())  # the dataset's own protocols decide
    never = never_negatives(records, gallery_ids, gallery_captions, by_caption)
    scores, indices = hard_negatives(features["composed"], never, gallery, cfg, device)
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
