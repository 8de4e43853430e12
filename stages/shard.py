"""Stage `shard`: the resized dataset -> WebDataset tar shards per split, with a checksummed index.

    python -m stages.shard --input data/resized --output data/shards

Reads only the `shard` section of params.yaml. For every split: gallery shards (one sample per
image, with every caption of the image from captions.parquet when the input has one, else its
manifest caption) and query shards (one sample per query, with both images), in manifest order;
folds.json, when the input has one, is copied beside them. Layout and sample format in
stages.shards. The output directory appears only once complete.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field
from typing_extensions import Annotated

from stages import captions, manifest, shards
from stages.atomic import staged_dir, write_json
from stages.cli import run_stage
from stages.params import PARAMS_FILE, load, section


@section
class ShardConfig:
    maxcount: Annotated[int, Field(gt=0)]  # samples per tar
    maxsize: Annotated[int, Field(gt=0)]  # payload bytes per tar


@dataclass(frozen=True)
class Summary:
    splits: dict[str, dict[str, Any]]  # the index's "splits"
    megabytes: float
    seconds: float

    def line(self, output: Path | str) -> str:
        parts = [
            f"{split} gallery {kinds['gallery']['count']}/{len(kinds['gallery']['shards'])} "
            f"queries {kinds['queries']['count']}/{len(kinds['queries']['shards'])}"
            for split, kinds in sorted(self.splits.items())
        ]
        return (
            f"shard: samples/shards {'; '.join(parts)}; {self.megabytes:.1f} MB in {self.seconds:.1f} s -> {output}"
        )


def gallery_samples(images: list[dict[str, str]], input_dir: Path,
                    captions_of: dict[str, list[dict[str, str]]] | None):
    """`captions_of`: image_id -> its captions as {caption_id, text}; None = each image's own caption."""
    for sample_key, image in zip(shards.unique_keys(i["image_id"] for i in images), images):
        own = None if captions_of is None else captions_of[image["image_id"]]
        yield shards.gallery_sample(sample_key, image["image_id"], image["caption"], input_dir / image["path"], own)


def query_samples(queries: list[dict[str, str]], path_of: dict[str, str], input_dir: Path):
    for sample_key, query in zip(shards.unique_keys(q["query_id"] for q in queries), queries):
        reference, target = input_dir / path_of[query["reference_id"]], input_dir / path_of[query["target_id"]]
        yield shards.query_sample(sample_key, query, reference, target)


def rows_by_split(table: pa.Table, splits: list[str]) -> dict[str, list[dict[str, str]]]:
    """The table's rows grouped by split, each group in table order."""
    groups: dict[str, list[dict[str, str]]] = {split: [] for split in splits}
    for row in table.to_pylist():
        groups[row["split"]].append(row)
    return groups


def image_captions(input_dir: Path, images: pa.Table) -> dict[str, list[dict[str, str]]] | None:
    """image_id -> its captions from the input's captions.parquet (checked: every image has one);
    None when the input has no captions file."""
    if not (input_dir / captions.CAPTIONS_FILE).exists():
        return None
    return captions.of_images(captions.read(input_dir, images), images, input_dir)


def write_split(work: Path, split: str, images: list[dict[str, str]], queries: list[dict[str, str]],
                path_of: dict[str, str], input_dir: Path, cfg: ShardConfig,
                captions_of: dict[str, list[dict[str, str]]] | None = None) -> dict[str, Any]:
    """Gallery and query shards of one split; returns its index entry."""
    gallery = gallery_samples(images, input_dir, captions_of)
    split_queries = query_samples(queries, path_of, input_dir)
    return {
        "gallery": shards.write_shards(work, split, "gallery", gallery, cfg.maxcount, cfg.maxsize),
        "queries": shards.write_shards(work, split, "queries", split_queries, cfg.maxcount, cfg.maxsize),
    }


def total_megabytes(shard_dir: Path, splits: dict[str, dict[str, Any]]) -> float:
    sizes = [
        (shard_dir / shard["file"]).stat().st_size
        for kinds in splits.values() for kind in shards.KINDS for shard in kinds[kind]["shards"]
    ]
    return sum(sizes) / 1e6


def run_shard(input_dir: Path | str, output_dir: Path | str, cfg: ShardConfig) -> Summary:
    """Shard the resized dataset in `input_dir` into `output_dir` (see the module doc)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    images, queries = manifest.read(input_dir)
    splits = sorted(set(images.column("split").to_pylist()))
    for split in splits:
        shards.check_split_name(split)
    images_of, queries_of = rows_by_split(images, splits), rows_by_split(queries, splits)
    path_of = dict(zip(images.column("image_id").to_pylist(), images.column("path").to_pylist()))
    captions_of = image_captions(input_dir, images)
    start = time.perf_counter()
    with staged_dir(output_dir) as work:
        index: dict[str, Any] = {"format": shards.INDEX_FORMAT, "splits": {}}
        for split in splits:
            index["splits"][split] = write_split(
                work, split, images_of[split], queries_of[split], path_of, input_dir, cfg, captions_of
            )
        if (input_dir / captions.FOLDS_FILE).exists():
            index["folds"] = shards.write_folds(work, input_dir / captions.FOLDS_FILE)
        write_json(work / shards.INDEX_FILE, index)
        megabytes = total_megabytes(work, index["splits"])
    return Summary(index["splits"], megabytes, time.perf_counter() - start)


def shard(input_dir: Path | str, output_dir: Path | str, params_path: Path | str = PARAMS_FILE) -> str:
    """The stage: read `shard` params, run, return the one-line summary."""
    cfg = load(ShardConfig, "shard", params_path)
    return run_shard(input_dir, output_dir, cfg).line(output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="resized dataset, e.g. data/resized")
    parser.add_argument("--output", type=Path, required=True, help="output directory, e.g. data/shards")
    args = parser.parse_args(argv)
    run_stage(lambda: print(shard(args.input, args.output)))


if __name__ == "__main__":
    main()
