"""Stage `evaluate`: recall@K of the final model on each test split, with two ablations.

For every query the reference image is removed from its own results; a hit is the target image
(the embedded gallery is deduplicated, so the target id is the one right answer). Besides the
composed query it scores `image_only` (the reference's φ_x: ignores the text) and `text_only`
(the composition with a zero image feature: ignores the image), and the harmonic mean over the
splits (test vs novel: how much the model loses on unseen attribute combinations) and GA's WHM
in the provisional reading chosen by `evaluate.whm`.

python -m stages.evaluate --model data/train/model.pt --shards data/shards --out metrics/evaluate.json
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from typing import Literal

import torch
from pydantic import Field
from typing_extensions import Annotated

from stages.atomic import write_json
from stages.cli import StageError, run_stage
from stages.embedding import embed_gallery, embed_queries, load_for_embedding
from stages.params import load, require, section
from stages.retrieval import chunked_topk, recall_at_k, whm_over_recall_levels, whm_over_splits
from stages.training import DeviceName, pick_device

MODES = {"tirg": "composed", "image_only": "image_only", "text_only": "text_only"}


@section
class WHMConfig:
    definition: Literal["splits", "recall_levels"]  # provisional: see stages/retrieval.py
    beta: Annotated[float, Field(gt=0)]             # `splits`: weight of the unseen split
    weights: list[Annotated[float, Field(gt=0)]]    # `recall_levels`: one per evaluate.ks


@section
class EvaluateConfig:
    splits: list[str]
    ks: list[Annotated[int, Field(gt=0)]]
    batch_size: Annotated[int, Field(gt=0)]
    device: DeviceName
    whm: WHMConfig

    def __post_init__(self):
        require(len(self.splits) > 0, "splits", "name at least one split")
        require(len(set(self.splits)) == len(self.splits), "splits", "a split is named twice")
        require(len(self.ks) > 0 and self.ks == sorted(set(self.ks)), "ks", "must be increasing and non-empty")
        require(self.whm.definition != "splits" or len(self.splits) == 2, "whm.definition",
                "'splits' compares exactly two splits (seen, unseen); evaluate.splits names "
                f"{len(self.splits)}")
        require(len(self.whm.weights) == len(self.ks), "whm.weights", "needs one weight per evaluate.ks")


def whm(per_split: dict[str, dict[str, float]], cfg: EvaluateConfig) -> dict[str, float]:
    """WHM of one model: per recall level over (seen, unseen) splits, or per split over recall levels."""
    if cfg.whm.definition == "splits":
        seen, unseen = (per_split[s] for s in cfg.splits)
        return {key: round(whm_over_splits(seen[key], unseen[key], cfg.whm.beta), 2) for key in seen}
    return {split: round(whm_over_recall_levels([per_split[split][f"r{k}"] for k in cfg.ks], cfg.whm.weights), 2)
            for split in cfg.splits}


def score_split(model, vocab, shard_dir: Path, split: str, cfg: EvaluateConfig, device) -> dict[str, dict]:
    gallery_ids, gallery = embed_gallery(model, shard_dir, split, cfg.batch_size, device)
    if cfg.ks[-1] >= len(gallery_ids):
        raise StageError(f"evaluate.ks: recall@{cfg.ks[-1]} needs more than {len(gallery_ids)} '{split}' gallery images")
    records, features = embed_queries(model, vocab, shard_dir, split, cfg.batch_size, device, tuple(MODES.values()))
    position = {image_id: i for i, image_id in enumerate(gallery_ids)}
    for r in records:
        for role in ("reference_id", "target_id"):
            if r[role] not in position:
                raise StageError(f"{shard_dir}: query {r['query_id']!r} has {role} {r[role]!r} outside the '{split}' gallery")
    references = torch.tensor([[position[r["reference_id"]]] for r in records])
    targets = torch.tensor([position[r["target_id"]] for r in records])
    result = {}
    for name, mode in MODES.items():
        _, ranked = chunked_topk(features[mode], gallery, cfg.ks[-1], exclude=references)
        recalls = recall_at_k(ranked, targets, cfg.ks)
        result[name] = {k: round(100 * v, 2) for k, v in recalls.items()}
    result["counts"] = {"queries": len(records), "gallery": len(gallery_ids)}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg = load(EvaluateConfig, "evaluate")

    began = time.time()
    device = pick_device(cfg.device)
    model, vocab = load_for_embedding(args.model, device)
    per_split = {split: score_split(model, vocab, args.shards, split, cfg, device) for split in cfg.splits}
    metrics: dict[str, dict] = {name: {split: per_split[split][name] for split in cfg.splits} for name in MODES}
    if len(cfg.splits) > 1:
        for name in MODES:
            metrics[name]["harmonic"] = {
                key: round(statistics.harmonic_mean([per_split[s][name][key] for s in cfg.splits]), 2)
                for key in per_split[cfg.splits[0]][name]
            }
    for name in MODES:
        metrics[name]["whm"] = whm({split: per_split[split][name] for split in cfg.splits}, cfg)
    metrics["counts"] = {split: per_split[split]["counts"] for split in cfg.splits}
    write_json(args.out, metrics)
    k = 10 if 10 in cfg.ks else cfg.ks[-1]
    line = ", ".join(f"{split} R@{k} {metrics['tirg'][split][f'r{k}']:.1f}" for split in cfg.splits)
    baselines = ", ".join(f"{name} {metrics[name][cfg.splits[0]][f'r{k}']:.1f}" for name in ("image_only", "text_only"))
    print(f"evaluate: tirg {line} ({cfg.splits[0]} baselines: {baselines}) in {time.time() - began:.1f} s -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
