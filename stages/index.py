"""Stage `index`: the final model's features of the gallery images of each evaluation split and, for an image-text
matching model, of every caption of those splits, so that stages.search and stages.app answer a query without
re-embedding a gallery. Layout and reading: stages/retrieval/feature_index.py (index.json records the model file's
sha256; another model is refused when the index is read).

`index.splits: auto` indexes the splits the dataset declares for evaluation (the shards' evaluation.json), a list
names them.

python -m stages.index --model data/train/model.pt --shards data/shards --out data/index
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal, Union

import torch
from pydantic import Field
from typing_extensions import Annotated

from stages.common.atomic import staged_dir
from stages.common.cli import stage_parser
from stages.common.device import DeviceName, pick_device, place_model
from stages.common.errors import StageError, run_stage
from stages.common.params import load, require, section
from stages.common.validation import check_from
from stages.modeling.factory import load_model
from stages.modeling.text import tokenizer_from_state
from stages.retrieval import feature_index
from stages.retrieval.embedding import embed_captions, embed_gallery
from stages.shards import store

AUTO = "auto"


@section
class IndexConfig:
    splits: Union[Literal["auto"], list[str]]  # auto: the splits the dataset declares for evaluation
    batch_size: Annotated[int, Field(gt=0)]
    device: DeviceName

    def __post_init__(self):
        if self.splits != AUTO:
            require(len(self.splits) > 0, "splits", "name at least one split")
            require(len(set(self.splits)) == len(self.splits), "splits", "a split is named twice")


def resolve_splits(cfg: IndexConfig, shard_dir: Path | str) -> list[str]:
    if cfg.splits != AUTO:
        return list(cfg.splits)
    declared = store.read_evaluation(shard_dir)
    if declared is None:
        raise StageError(f"{shard_dir}: index.splits: auto reads the dataset's evaluation.json, which these shards do "
                         f"not carry (sharded before it existed? re-run prepare, resize and shard), or set it")
    return list(declared["splits"])


def build_index(model_path: Path, shard_dir: Path | str, splits: list[str], out: Path, batch_size: int,
                device: torch.device) -> dict:
    """Embed `splits` with the model at `model_path` into the index folder `out` (atomically); returns index.json."""
    model, cfg, text_state, _ = load_model(model_path)
    task = feature_index.model_task(model)
    model = place_model(model, device)
    tokenizer = tokenizer_from_state(text_state)
    counts, dim = {}, None
    with staged_dir(out) as work:
        for split in splits:
            image_ids, captions, gallery = embed_gallery(model, shard_dir, split, batch_size, device)
            caption_rows = caption_features = None
            if task == "matching":
                caption_ids, caption_images, caption_features = embed_captions(model, tokenizer, shard_dir, split,
                                                                               batch_size, device)
                texts = [text for _, _, text in store.iter_captions(shard_dir, split)]  # embed_captions' order
                caption_rows = (caption_ids, caption_images, texts)
            if not torch.isfinite(gallery).all() or (caption_features is not None
                                                     and not torch.isfinite(caption_features).all()):
                raise StageError(f"{model_path}: non-finite features on split {split!r}: the model is broken")
            dim = gallery.shape[1]
            counts[split] = feature_index.write_split(work, split, image_ids, captions, gallery, caption_rows,
                                                      caption_features)
        manifest = feature_index.write_manifest(work, model_path, cfg.name, task, dim, counts)
    return manifest


def check_params(path, declared: dict | None = None) -> None:
    """The `index` params as written (`auto` splits are read from the shards when the stage runs)."""
    load(IndexConfig, "index", path)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "python -m stages.index --model data/train/model.pt --shards data/shards "
                          "--out data/index", "the index folder")
    parser.add_argument("--model", type=Path, required=True, help="the trained checkpoint (data/train/model.pt)")
    parser.add_argument("--shards", type=store.location, required=True, help=store.LOCATION_HELP)
    args = parser.parse_args(argv)
    check_from("index", args.params)
    cfg = load(IndexConfig, "index", args.params)
    splits = resolve_splits(cfg, args.shards)
    began = time.time()
    manifest = build_index(args.model, args.shards, splits, args.out, cfg.batch_size, pick_device(cfg.device))
    counts = ", ".join(f"{split} {' + '.join(f'{n} {kind}' for kind, n in c.items())}"
                       for split, c in manifest["splits"].items())
    print(f"index: {manifest['task']} model {manifest['model_name']}, dim {manifest['dim']}: {counts} "
          f"in {time.time() - began:.1f} s -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
