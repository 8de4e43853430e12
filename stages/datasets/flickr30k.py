"""Flickr30k with Karpathy's splits, for image-text matching.

Inputs:
    <raw_dir>/dataset_flickr30k.json   Karpathy's split file (see stages.datasets.karpathy for where it may
                                       come from and how its records become rows)
    <images_dir>/<flickr id>.jpg       the images. They are form-gated (request them at
                                       http://shannon.cs.illinois.edu/DenotationGraph/, or take a mirror)
                                       so nothing is downloaded: a missing file is an error listing how
                                       many are missing per split and which, unless `on_missing: drop`

The JSON holds 31,014 of the 31,783 images (29,000 train / 1,014 val / 1,000 test); files in
images_dir that it does not name are ignored. The ITM protocol's Flickr30K 1K is the whole test split
(no folds).

Outputs in the prepared folder (besides images.parquet, whose caption is each image's first caption,
and an empty queries.parquet):
    images/<filename>     hard links to the source files (copies across filesystems)
    captions.parquet      every kept caption (stages.datasets.captions): 5 per image, caption_id = sentid
    ingest_report.json    counts per split, missing images, sha256 of the annotation file
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from pydantic import Field
from typing_extensions import Annotated

from stages.datasets import karpathy
from stages.datasets.karpathy import OnMissing
from stages.datasets.download import DownloadConfig
from stages.common.params import section
from stages.datasets.evaluation import Evaluation

EVALUATION = Evaluation(splits=("test",), validation="val")  # image-text matching: Flickr30K 1K

DATASET = karpathy.Dataset(
    name="flickr30k",
    json_name="dataset_flickr30k.json",
    has_folders=False,
    expected_counts={"train": 29_000, "val": 1_014, "test": 1_000},
    # The mirror stores the file as dataset_flickr32k.json.
    mirror_sha256="64c85af0e9d187091cb88890e56b3f640ac48386196a930d3ff8433d73165135",
    images_help=(
        "Flickr30k images are form-gated: request them at http://shannon.cs.illinois.edu/DenotationGraph/ "
        "(or use a mirror) and put the <flickr id>.jpg files directly in images_dir"
    ),
)


@section
class Config:
    raw_dir: str = "data/raw/flickr30k"
    karpathy_url: str | None = None
    images_dir: str = "data/raw/flickr30k/flickr30k-images"
    restval_as_train: bool = True  # the Flickr30k file has no restval; kept so both Karpathy adapters agree
    captions_per_image: Annotated[int, Field(ge=0)] = 5
    on_missing: OnMissing = "error"
    expect_full: bool = False


def build(cfg: Config, out_dir: Path, download: DownloadConfig) -> tuple[pa.Table, pa.Table]:
    """Ingest Flickr30k-Karpathy into `out_dir` (see the module doc); returns (images, empty queries).
    `download` is used only to fetch `karpathy_url` when it is set."""
    out_dir = Path(out_dir)
    annotation = karpathy.load(DATASET, cfg, download)
    ingested = karpathy.ingest(DATASET, annotation, cfg, out_dir)
    karpathy.write_outputs(out_dir, ingested, karpathy.report(DATASET, annotation, ingested, cfg))
    return ingested.images, karpathy.empty_queries()
