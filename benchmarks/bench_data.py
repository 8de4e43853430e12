"""Throughput of the data stages on the default data: resize (1 worker vs all cores), shard, mine.

    python benchmarks/bench_data.py [--size S]

Run from the repository root: the dataset is the one params.yaml describes (`dataset` section).
Mining is timed against a baseline that builds the full Q x G similarity matrix before `topk`.

Everything is written to a temporary directory that is removed at the end. Each measured step is
one `bench_*` function returning a Measurement; the table at the end lists them all.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from stages.retrieval.embedding import embed_gallery, embed_queries
from stages.shards.loaders import texts
from stages.mine import MineConfig
from stages.retrieval.negatives import hard_negatives, never_negatives
from stages.modeling.factory import ModelConfig, build_model
from stages.common.parallel import ParallelConfig
from stages.common.params import load, parse
from stages.prepare import prepare
from stages.resize import ResizeConfig, run_resize
from stages.shard import ShardConfig, run_shard
from stages.modeling.vocab import Vocab
from measure import Measurement, print_table  # benchmarks/measure.py (scripts run from benchmarks/)


def make_dataset(root: Path) -> Path:
    """The default dataset of params.yaml (`dataset` section), built as the `prepare` stage does."""
    prepare(root)
    return root


def bench_resize(prepared: Path, output: Path, size: int, workers: int) -> Measurement:
    cfg = parse(ResizeConfig, "resize", dict(size=size, mode="center_crop", pad_value=0, format="png",
                                             jpeg_quality=90))
    parallel = ParallelConfig(runner="processes", workers=workers, address=None, items_per_task=64)
    start = time.perf_counter()
    summary = run_resize(prepared, output, cfg, parallel)
    seconds = time.perf_counter() - start
    return Measurement(f"resize, {workers} worker{'s' if workers > 1 else ''}", summary.images_out, seconds)


def bench_shard(resized: Path, output: Path) -> Measurement:
    cfg = parse(ShardConfig, "shard", dict(maxcount=2000, maxsize=200_000_000))
    start = time.perf_counter()
    summary = run_shard(resized, output, cfg)
    seconds = time.perf_counter() - start
    samples = sum(kinds[kind]["count"] for kinds in summary.splits.values() for kind in ("gallery", "queries"))
    return Measurement("shard (gallery + queries samples)", samples, seconds)


def bench_mine(shards: Path, size: int) -> list[Measurement]:
    """Embedding + chunked top-k (the `mine` stage) vs the full matrix + topk, on the train split.

    The model is freshly initialised from the `model` params: throughput does not depend on weights.
    """
    cfg = load(MineConfig, "mine")
    vocab = Vocab.build(texts(shards, "train"))
    model = build_model(load(ModelConfig, "model"), len(vocab), size).eval()
    device = torch.device("cpu")
    start = time.perf_counter()
    gallery_ids, gallery_captions, gallery = embed_gallery(model, shards, "train", cfg.batch_size, device)
    records, features = embed_queries(model, vocab, shards, "train", cfg.batch_size, device)
    embedded = time.perf_counter()
    position = {image_id: i for i, image_id in enumerate(gallery_ids)}
    targets = torch.tensor([position[r["target_id"]] for r in records])
    queries = features["composed"]
    _, chunked = hard_negatives(queries, never_negatives(records, gallery_ids, gallery_captions), gallery, cfg)
    searched = time.perf_counter()
    full = queries @ gallery.T  # baseline: Q x G in memory at once
    full[torch.arange(len(targets)), targets] = float("-inf")
    baseline = full.topk(cfg.k, dim=1).indices
    done = time.perf_counter()
    if not torch.equal(chunked, baseline):
        raise AssertionError("chunked mining and the full-matrix baseline disagree")
    candidates = len(records) * cfg.k
    return [
        Measurement(f"embed {len(records)} queries + {len(gallery_ids)} images", len(records) + len(gallery_ids),
                    embedded - start),
        Measurement(f"mine top-{cfg.k}, chunked (candidates)", candidates, searched - embedded),
        Measurement(f"mine top-{cfg.k}, full matrix baseline", candidates, done - searched),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="resize.size")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        tmp = Path(tmp)
        prepared = make_dataset(tmp / "prepared")
        one = bench_resize(prepared, tmp / "resized-1", args.size, workers=1)
        all_cores = bench_resize(prepared, tmp / "resized-all", args.size, workers=cores)
        sharded = bench_shard(tmp / "resized-all", tmp / "shards")
        mined = bench_mine(tmp / "shards", args.size)
    print()
    print_table([one, all_cores, sharded, *mined])
    print(f"resize speed-up with {cores} workers: {all_cores.rate / one.rate:.2f}x")
    print(f"chunked mining vs full matrix: {mined[1].rate / mined[2].rate:.2f}x the candidates/s")


if __name__ == "__main__":
    main()
