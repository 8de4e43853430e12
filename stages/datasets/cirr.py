"""CIRR (Liu et al. 2021): real-life images from NLVR2, each query a reference image and a caption
saying how the target differs ("show three bottles of soft drink").

Sources (Cuberick-Orion/CIRR), under `raw_dir` (fetched from `annotation_base_url` when set; the
annotations are on branch `cirr_dataset` of Cuberick-Orion/CIRR):

    captions/cap.rc2.<split>.json          [{"pairid": 12060, "reference": name, "target_hard": name,
                                             "caption": str, "target_soft": {...}, "img_set": {...}}, ...]
                                           (test1 has no target_hard / target_soft)
    image_splits/split.rc2.<split>.json    {name: "./dev/<name>.png", ...}: every image of the split

Splits are `train`, `val` and `test1` (the folder of val images is `dev/`). The extended captions
(captions_ext/) are not read: the manifest has one text per query, the protocol uses `caption`.

Images are NLVR2's, behind a form (https://github.com/lil-lab/nlvr/tree/master/nlvr2): `images_dir` is
the folder holding the `train/<0..99>/`, `dev/` and `test1/` sub-folders; each image is found there by
the relative path of the split file.

Manifest:
* image_id = NLVR2 name (`dev-244-0-img0`), path `images/<relative path of the split file>`
  (`images/dev/dev-244-0-img0.png`), caption "" (CIRR has no per-image caption). Every image of the
  split file is in it (the gallery of the CIRR protocol is the whole split).
* query_id `cirr-<split>-<pairid>`, reference = `reference`, target = `target_hard`, text = `caption`.
  test1 has no target: ingesting it gives its images and no queries (`no_target`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

from stages.datasets.common import (
    Candidate,
    ImageRow,
    IngestReport,
    annotation_files,
    assign_image_splits,
    check_count,
    expect_list,
    expect_string,
    is_usable_file,
    manifest_path,
    place_images,
    read_json,
    record_error,
    report_missing_images,
    require_images_dir,
    select_queries,
    tables,
)
from stages.common.errors import StageError
from stages.datasets.download import DownloadConfig
from stages.common.params import require, section
from stages.datasets.evaluation import Evaluation

EVALUATION = Evaluation(splits=("val",), protocols=("target",), ks=(1, 5, 10, 50))  # CIRR val (test1 has no targets)

SPLITS = ("train", "val", "test1")

# Counts read in the CIRR annotation files. The train pair count (28,225) is the paper's, unverified: not asserted.
DOCUMENTED_PAIRS = {"val": 4_181, "test1": 4_148}
DOCUMENTED_SPLIT_IMAGES = {"train": 16_939, "val": 2_297, "test1": 2_315}

HOW_TO_GET_ANNOTATIONS = (
    "CIRR annotations: captions/ and image_splits/ of branch cirr_dataset of https://github.com/Cuberick-Orion/CIRR; "
    "put them under raw_dir or set dataset.cirr.annotation_base_url to fetch them."
)
HOW_TO_GET_IMAGES = (
    "The CIRR images are NLVR2's raw images: request them with the form linked at "
    "https://github.com/lil-lab/nlvr/tree/master/nlvr2#direct-image-download (if it does not answer, "
    "email the CIRR authors) and unpack them so that dataset.cirr.images_dir holds train/<0..99>/, dev/ "
    "and test1/ as the image_splits files name them."
)


@section
class Config:
    raw_dir: str  # annotation files, e.g. data/raw/cirr
    images_dir: str  # the NLVR2 images: train/, dev/, test1/ (manual download)
    annotation_base_url: str | None  # fetch captions/ and image_splits/ from here; None = already in raw_dir
    splits: list[Literal["train", "val", "test1"]]
    expect_full: bool  # assert the documented counts of the full dataset

    def __post_init__(self) -> None:
        require(bool(self.raw_dir), "raw_dir", "must not be empty")
        require(bool(self.images_dir), "images_dir", "must not be empty")
        require(bool(self.splits), "splits", f"must name at least one of {list(SPLITS)}")
        require(len(set(self.splits)) == len(self.splits), "splits", f"has duplicates: {self.splits}")


@dataclass(frozen=True)
class Pair:
    index: int  # position in its caption file
    pairid: int
    reference: str
    target: str | None  # target_hard; None in test1
    caption: str


def caption_file(split: str) -> str:
    return f"captions/cap.rc2.{split}.json"


def split_file(split: str) -> str:
    return f"image_splits/split.rc2.{split}.json"


def parse_pairs(path: Path) -> list[Pair]:
    pairs = []
    seen: set[int] = set()
    for index, record in enumerate(expect_list(path, read_json(path), "pairs")):
        where = f"record {index}"
        if not isinstance(record, dict):
            raise record_error(path, where, f"expected an object, got {record!r}")
        pairid = record.get("pairid")
        if not isinstance(pairid, int) or isinstance(pairid, bool):
            raise record_error(path, where, f"'pairid' must be an integer, got {pairid!r}")
        if pairid in seen:
            raise record_error(path, where, f"pairid {pairid} appears twice")
        seen.add(pairid)
        where = f"record {index} (pairid {pairid})"
        reference = expect_string(path, where, record.get("reference"), "reference")
        target = expect_string(path, where, record["target_hard"], "target_hard") if "target_hard" in record else None
        caption = record.get("caption")
        if not isinstance(caption, str):  # may be empty: test1 pairid 27098
            raise record_error(path, where, f"'caption' must be a string, got {caption!r}")
        pairs.append(Pair(index, pairid, reference, target, caption))
    return pairs


def parse_split_map(path: Path) -> dict[str, str]:
    """NLVR2 name -> relative path of its image (e.g. './dev/dev-244-0-img0.png')."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a JSON object of image name -> path, got {type(data).__name__}")
    for name, relative in data.items():
        expect_string(path, f"entry {name!r}", relative, "path")
    return data


def check_pairs_use_listed_images(path: Path, pairs: list[Pair], split_map: dict[str, str], map_path: Path) -> None:
    for pair in pairs:
        for role, name in (("reference", pair.reference), ("target_hard", pair.target)):
            if name is not None and name not in split_map:
                raise record_error(path, f"record {pair.index} (pairid {pair.pairid})",
                                   f"{role} {name} is not in {map_path}")


def build(cfg: Config, out_dir: Path, download: DownloadConfig) -> tuple[pa.Table, pa.Table]:
    """Read the annotations and the NLVR2 images, link the images into out_dir, return the manifests."""
    raw_dir, images_dir, out_dir = Path(cfg.raw_dir), Path(cfg.images_dir), Path(out_dir)
    report = IngestReport("cirr", raw_dir)
    relative_paths = [f(split) for split in cfg.splits for f in (caption_file, split_file)]
    files = annotation_files(raw_dir, relative_paths, {"": cfg.annotation_base_url}, download, HOW_TO_GET_ANNOTATIONS)

    pairs: dict[str, list[Pair]] = {}
    split_maps: dict[str, dict[str, str]] = {}
    for split in cfg.splits:
        captions_path, map_path = files[caption_file(split)], files[split_file(split)]
        pairs[split] = parse_pairs(report.annotation(captions_path))
        split_maps[split] = parse_split_map(report.annotation(map_path))
        check_pairs_use_listed_images(captions_path, pairs[split], split_maps[split], map_path)
        if cfg.expect_full:
            if split in DOCUMENTED_PAIRS:
                check_count(captions_path, "pairs", DOCUMENTED_PAIRS[split], len(pairs[split]))
            check_count(map_path, "images", DOCUMENTED_SPLIT_IMAGES[split], len(split_maps[split]))

    # NLVR2 names start with their split, so no image is in two splits; the priority only guards that.
    image_split = assign_image_splits(
        ((name, split) for split in cfg.splits for name in split_maps[split]), tuple(cfg.splits)
    )
    require_images_dir("CIRR", images_dir, HOW_TO_GET_IMAGES)
    rows = []
    for name, split in image_split.items():
        path = manifest_path(split_maps[split][name], f"{files[split_file(split)]}: entry {name!r}")
        rows.append(ImageRow(name, path, split, "", images_dir / path.removeprefix("images/")))
    present = {row.image_id for row in rows if is_usable_file(row.source)}
    missing = [row.image_id for row in rows if row.image_id not in present]
    report_missing_images("CIRR", images_dir, missing, len(rows), HOW_TO_GET_IMAGES)
    images = place_images(rows, present, out_dir, report)

    candidates = [
        Candidate(f"cirr-{split}-{pair.pairid}", split, pair.reference, pair.caption.strip(), pair.target)
        for split in cfg.splits
        for pair in pairs[split]
    ]
    queries = select_queries(candidates, image_split, present, report)
    report.write(out_dir)
    return tables(images, queries)
