"""Stage `evaluate`: recall@K of the final model on each evaluation split, under the dataset's protocols,
with two ablations.

`evaluate.protocols` picks how a hit is counted and which gallery a query searches (stages/protocols.py):
`target` (exact target image; the embedded shapes data, Shoes, CIRR), `caption` (TIRG's caption-level
hit; CSS3D, MIT-States, Fashion200k), `fashioniq_val_union` and `fashioniq_clip4cir` (FashionIQ per
category, the VAL/AMC and CLIP4Cir protocols, reported side by side, never mixed).
Besides the composed query it scores `image_only` (the reference encoded as a gallery image: ignores the
text) and `text_only` (the composition with the reference representation zeroed: ignores the image);
for the flat protocols also the harmonic mean over the splits and GA's WHM in the provisional reading
chosen by `evaluate.whm`. Several --model checkpoints are scored as one ensemble (AMC's test_ensemble.py:
concatenated unit vectors, i.e. the mean of the models' cosines).

With `--per-query FOLDER` it also writes, per split, FOLDER/<split>.parquet: each composed query's rank of its
target under each protocol and its top `evaluate.per_query_k` gallery ids (task matching: each caption's t2i and
each image's i2t rank and top-k), as stages/retrieval/per_query.py describes; with `per_query_k: 0` the folder holds
only skipped.json.

python -m stages.evaluate --model data/train/model.pt --shards data/shards --out metrics/evaluate.json \
    --per-query data/evaluate
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Literal, Union

import torch
import torch.nn.functional as F
from pydantic import Field
from typing_extensions import Annotated

from stages.common.atomic import staged_dir, write_json
from stages.common.provenance import provenance
from stages.common.errors import StageError, run_stage
from stages.shards import store
from stages.retrieval.embedding import embed_gallery, embed_matching_split, embed_queries, load_for_embedding
from stages.retrieval.matching_metrics import coco_1k_folds, fold_rows, i2t_t2i
from stages.retrieval import per_query
from stages.common.params import PARAMS_FILE, ParamsError, load, read_task, require, section
from stages.retrieval.rerank import SIAM_FILE, gallery_maps, load_siam, rerank_t2i
from stages.retrieval.protocols import score
from stages.retrieval.whm import whm_over_recall_levels, whm_over_splits
from stages.common.device import DeviceName, pick_device
from stages.common.cli import stage_parser
from stages.common.validation import check_from

MODES = ("composed", "image_only", "text_only")
FLAT_PROTOCOLS = ("target", "caption")  # one recall per K: harmonic mean and WHM apply
Protocol = Literal["target", "caption", "fashioniq_val_union", "fashioniq_clip4cir"]


AUTO = "auto"  # read from the dataset's declaration (stages.datasets.evaluation) in the shards
Auto = Literal["auto"]
PositiveK = Annotated[int, Field(gt=0)]


@section
class WHMConfig:
    definition: Literal["auto", "splits", "recall_levels"]  # provisional: see stages/retrieval.py
    beta: Annotated[float, Field(gt=0)]             # `splits`: weight of the unseen split
    weights: Union[Auto, list[Annotated[float, Field(gt=0)]]]  # `recall_levels`: one per evaluate.ks


@section
class EvaluateConfig:
    splits: Union[Auto, list[str]]
    protocols: Union[Auto, list[Protocol]]
    ks: Union[Auto, list[PositiveK]]
    batch_size: Annotated[int, Field(gt=0)]
    query_chunk: Annotated[int, Field(gt=0)]     # rows of a similarity block (stages/retrieval.py)
    gallery_chunk: Annotated[int, Field(gt=0)]   # columns of a similarity block
    device: DeviceName
    rare_words_as_unknown_below: Annotated[int, Field(ge=0)]  # quirk (VAL FashionIQ/Shoes: 2); 0 = off
    matching_ks: list[PositiveK]                              # task matching
    rerank_k: Annotated[int, Field(ge=0)]                     # task matching with a SIAM; 0 = no re-ranking
    per_query_k: Annotated[int, Field(ge=0)]                  # --per-query: top-k ids kept per query; 0 = none
    whm: WHMConfig

    def __post_init__(self):
        if self.splits != AUTO:
            require(len(self.splits) > 0, "splits", "name at least one split")
            require(len(set(self.splits)) == len(self.splits), "splits", "a split is named twice")
        if self.protocols != AUTO:
            require(len(set(self.protocols)) == len(self.protocols), "protocols", "name each protocol once")
        if self.ks != AUTO:
            require(len(self.ks) > 0 and self.ks == sorted(set(self.ks)), "ks", "must be increasing and non-empty")
        if self.whm.definition == "splits" and self.splits != AUTO:
            require(len(self.splits) == 2, "whm.definition", "'splits' compares exactly two splits (seen, unseen); "
                    f"evaluate.splits names {len(self.splits)}")
        if self.whm.weights != AUTO and self.ks != AUTO:
            require(len(self.whm.weights) == len(self.ks), "whm.weights", "needs one weight per evaluate.ks")


def resolve(cfg: EvaluateConfig, declared: dict | None, where: str) -> EvaluateConfig:
    """`cfg` with every `auto` replaced by the dataset's declaration (`declared`, from the shards at `where`)."""
    autos = [name for name, value in (("splits", cfg.splits), ("protocols", cfg.protocols), ("ks", cfg.ks),
                                      ("whm.definition", cfg.whm.definition), ("whm.weights", cfg.whm.weights))
             if value == AUTO]
    if not autos:
        return cfg
    if declared is None:
        raise StageError(f"{where}: evaluate.{autos[0]}: auto reads the dataset's evaluation.json, which these shards "
                         f"do not carry (sharded before it existed? re-run prepare, resize and shard), or set it")
    ks = declared["ks"] if cfg.ks == AUTO else cfg.ks
    splits = declared["splits"] if cfg.splits == AUTO else cfg.splits
    if cfg.whm.weights != AUTO:
        weights = cfg.whm.weights
    else:
        weights = declared["whm_weights"] if cfg.ks == AUTO else [1.0] * len(ks)
    definition = cfg.whm.definition
    if definition == AUTO:
        definition = declared["whm_definition"] if len(splits) == 2 or declared["whm_definition"] != "splits" \
            else "recall_levels"
    try:
        return dataclasses.replace(cfg, splits=list(splits), ks=list(ks),
                                   protocols=list(declared["protocols"]) if cfg.protocols == AUTO else cfg.protocols,
                                   whm=dataclasses.replace(cfg.whm, definition=definition, weights=list(weights)))
    except ValueError as err:
        raise ParamsError(f"{PARAMS_FILE}: evaluate: {err}".split("\nFor further information")[0]) from None


def whm(per_split: dict[str, dict[str, float]], cfg: EvaluateConfig) -> dict[str, float]:
    """WHM of one model: per recall level over (seen, unseen) splits, or per split over recall levels."""
    if cfg.whm.definition == "splits":
        seen, unseen = (per_split[s] for s in cfg.splits)
        return {key: round(whm_over_splits(seen[key], unseen[key], cfg.whm.beta), 2) for key in seen}
    return {split: round(whm_over_recall_levels([per_split[split][f"r{k}"] for k in cfg.ks], cfg.whm.weights), 2)
            for split in cfg.splits}


def embed_split(models, shard_dir: Path, split: str, cfg: EvaluateConfig, device):
    """Gallery (ids, captions, features) and query (records, {mode: features}); an ensemble concatenates
    each model's unit vectors and re-normalises."""
    galleries, query_features = [], []
    for model, tokenizer in models:
        galleries.append(embed_gallery(model, shard_dir, split, cfg.batch_size, device))
        records, features = embed_queries(model, tokenizer, shard_dir, split, cfg.batch_size, device, MODES,
                                          cfg.rare_words_as_unknown_below)
        query_features.append(features)
    gallery_ids, captions = galleries[0][0], galleries[0][1]
    gallery = F.normalize(torch.cat([g[2] for g in galleries], dim=1), dim=1)
    queries = {mode: F.normalize(torch.cat([f[mode] for f in query_features], dim=1), dim=1) for mode in MODES}
    return gallery_ids, captions, gallery, records, queries


def score_split(models, shard_dir: Path, split: str, cfg: EvaluateConfig, device,
                per_query_k: int = 0) -> tuple[dict[str, dict], list[dict]]:
    """({mode: {protocol: result}} of one split, its per-query rows of the composed queries under every protocol
    when per_query_k > 0, else [])."""
    gallery_ids, captions, gallery, records, queries = embed_split(models, shard_dir, split, cfg, device)
    try:
        scores = {mode: {protocol: score(protocol, gallery_ids, captions, gallery, records, queries[mode], cfg.ks,
                                         cfg.query_chunk, cfg.gallery_chunk, device)
                         for protocol in cfg.protocols}
                  for mode in MODES}
    except ValueError as err:
        raise StageError(f"{shard_dir} split '{split}': {err}") from None
    rows = [row for protocol in cfg.protocols if per_query_k
            for row in per_query.composed_rows(protocol, gallery_ids, captions, gallery, records, queries["composed"],
                                               per_query_k, cfg.query_chunk)]
    return scores, rows


def with_split_means(per_split: dict[str, dict], cfg: EvaluateConfig) -> dict:
    """metrics[mode][split][protocol] plus, for the flat protocols, [mode]["harmonic"|"whm"][protocol]."""
    metrics: dict[str, dict] = {mode: {split: per_split[split][mode] for split in cfg.splits} for mode in MODES}
    for mode in MODES:
        for protocol in (p for p in cfg.protocols if p in FLAT_PROTOCOLS):
            recalls = {split: {k: v for k, v in per_split[split][mode][protocol].items() if k.startswith("r")}
                       for split in cfg.splits}
            if len(cfg.splits) > 1:
                metrics[mode].setdefault("harmonic", {})[protocol] = {
                    key: round(statistics.harmonic_mean([recalls[s][key] for s in cfg.splits]), 2)
                    for key in recalls[cfg.splits[0]]
                }
            metrics[mode].setdefault("whm", {})[protocol] = whm(recalls, cfg)
    return metrics


def headline(metrics: dict, cfg: EvaluateConfig) -> str:
    protocol, split = cfg.protocols[0], cfg.splits[0]
    result = metrics["composed"][split][protocol]
    if protocol in FLAT_PROTOCOLS:
        k = 10 if 10 in cfg.ks else cfg.ks[-1]
        line = ", ".join(f"{s} R@{k} {metrics['composed'][s][protocol][f'r{k}']:.1f}" for s in cfg.splits)
        base = ", ".join(f"{m} {metrics[m][split][protocol][f'r{k}']:.1f}" for m in ("image_only", "text_only"))
        return f"{protocol}: {line} ({split} baselines: {base})"
    recalls = ", ".join(f"R@{key[1:]} {value:.1f}" for key, value in result["average"].items())
    return f"{protocol} {split}: mean {result['mean']:.1f} ({recalls}, averaged over categories)"


def score_matching(model, tokenizer, shard_dir: Path, split: str, cfg: EvaluateConfig, device, siam=None,
                   per_query_k: int = 0) -> tuple[dict, list[dict]]:
    """(i2t (best of an image's captions) and t2i recall@K, medr, meanr, rsum over the whole split (COCO 5K,
    Flickr30k 1K), with the shards' folds.json also the COCO 1K five-fold average of the folds in this split;
    the split's per-query rows when per_query_k > 0, else [])."""
    image_ids, images, caption_ids, texts, text_image = embed_matching_split(model, tokenizer, shard_dir, split,
                                                                           cfg.batch_size, device)
    rows = []
    if per_query_k:
        caption_texts = [text for _, _, text in store.iter_captions(shard_dir, split)]  # embed_captions' order
        rows = per_query.matching_rows(image_ids, images, caption_ids, caption_texts, texts, text_image,
                                       per_query_k, cfg.query_chunk)
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    result = {"all": i2t_t2i(images, texts, text_image, cfg.matching_ks, cfg.query_chunk, cfg.gallery_chunk),
              "counts": {"images": len(image_ids), "captions": len(caption_ids)}}
    folds = {name: ids for name, ids in (store.read_folds(shard_dir) or {}).items() if ids and ids[0] in row}
    if folds:
        try:
            folded = coco_1k_folds(images, texts, text_image, fold_rows(folds, image_ids), cfg.matching_ks,
                                   cfg.query_chunk, cfg.gallery_chunk)
        except ValueError as err:
            raise StageError(f"{shard_dir} split '{split}' folds: {err}") from None
        result["folds_average"] = folded["average"]
    if siam is not None and cfg.rerank_k:
        maps = gallery_maps(model, shard_dir, split, cfg.batch_size, device)
        result["siam_reranked"] = {"t2i": rerank_t2i(siam, maps.to(device), images.to(device), texts.to(device),
                                                     text_image.to(device), cfg.rerank_k, cfg.matching_ks)}
    return result, rows


def write_per_query(folder: Path, rows: dict[str, list[dict]], task: str, k: int) -> None:
    """The per-query folder, atomically: <split>.parquet per split, or skipped.json when per_query_k is 0."""
    with staged_dir(folder) as work:
        if not k:
            per_query.write_skipped(work, "evaluate.per_query_k is 0")
        for split, split_rows in rows.items():
            per_query.write_split(work, split, split_rows, task)


def check_params(path, declared: dict | None = None) -> None:
    """The `evaluate` params as written (`auto` values are resolved from the shards when the stage runs)."""
    load(EvaluateConfig, "evaluate", path)


def model_files(paths: list[Path]) -> dict[str, Path]:
    """The evaluated checkpoints by name for the provenance block: model, or model_1, model_2, ... (an ensemble)."""
    return {"model": paths[0]} if len(paths) == 1 else {f"model_{i}": p for i, p in enumerate(paths, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "python -m stages.evaluate --model data/train/model.pt --shards data/shards "
                          "--out metrics/evaluate.json", "the metrics file (JSON)")
    parser.add_argument("--model", type=Path, nargs="+", required=True, help="one checkpoint, or several: an ensemble")
    parser.add_argument("--shards", type=store.location, required=True, help=store.LOCATION_HELP)
    parser.add_argument("--per-query", type=Path,
                        help="a folder for each split's per-query ranks and top-k ids (evaluate.per_query_k)")
    args = parser.parse_args(argv)
    declared = store.read_evaluation(args.shards)
    check_from("evaluate", args.params, declared)
    cfg = load(EvaluateConfig, "evaluate", args.params)
    cfg = resolve(cfg, declared, str(args.shards))

    began = time.time()
    device = pick_device(cfg.device)
    models = [load_for_embedding(path, device) for path in args.model]
    k = cfg.per_query_k if args.per_query else 0  # without a folder nothing asks for the rows
    if read_task(args.params, declared) == "matching":
        if len(models) > 1:
            raise StageError("evaluate: an ensemble is offered for composed retrieval only (task is matching)")
        siam = load_siam(args.model[0].parent / SIAM_FILE, device)
        scored = {split: score_matching(*models[0], args.shards, split, cfg, device, siam, k) for split in cfg.splits}
        metrics = {split: result for split, (result, _) in scored.items()}
        if args.per_query:
            write_per_query(args.per_query, {split: rows for split, (_, rows) in scored.items() if k}, "matching", k)
        write_json(args.out, {**metrics, "provenance": provenance(device, **model_files(args.model))})
        line = ", ".join(f"{s} rsum {metrics[s]['all']['rsum']:.1f}" for s in cfg.splits)
        print(f"evaluate: matching {line} in {time.time() - began:.1f} s -> {args.out}")
        return
    if not cfg.protocols:
        raise ParamsError(f"{args.params}: evaluate.protocols: the dataset declares no composed-retrieval protocol "
                          f"(an image-text matching dataset: set task: matching), or name one")
    scored = {split: score_split(models, args.shards, split, cfg, device, k) for split in cfg.splits}
    metrics = with_split_means({split: result for split, (result, _) in scored.items()}, cfg)
    if args.per_query:
        write_per_query(args.per_query, {split: rows for split, (_, rows) in scored.items() if k}, "composed", k)
    write_json(args.out, {**metrics, "provenance": provenance(device, **model_files(args.model))})
    print(f"evaluate: {headline(metrics, cfg)} in {time.time() - began:.1f} s -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
