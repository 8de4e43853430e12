"""Shoes (Guo et al. 2018 relative captions on the Berg et al. 2010 attribute-dataset images).

Sources (XiaoxiaoGuo/fashion-retrieval), under `raw_dir` (fetched from `annotation_base_url` when set):

    relative_captions_shoes.json  [{"ImageName": target, "ReferenceImageName": reference,
                                    "RelativeCaption": "is more of a textured material"}, ...]
    train_im_names.txt            image file names of the train split, one per line
    eval_im_names.txt             image file names of the evaluation split (the 4,658-line version)
    captions_shoes.json           [{"ImageName": ..., "Caption": "black strappy high heels"}, ...] (3,600 images)

"ImageName" is the TARGET and "ReferenceImageName" the reference: the caption says how the target
differs from the reference (ARTEMIS dataset_shoes.py reads them so).

Images cannot be downloaded any more (http://tamaraberg.com/attributesDataset/attributedata.tar.gz is
dead since 2022): `images_dir` is a folder you unpacked yourself; images are found anywhere below it by
file name (the names are unique), whatever the sub-folders (attributedata/womens_<cat>/<0|1>/ or womens/*/*/).

Manifest:
* image_id = file name without extension (`img_womens_clogs_851`), path `images/<file name>`, caption
  from captions_shoes.json where it has one, else "". Every image of the two name lists is in it (the
  gallery is the whole evaluation list, as in ARTEMIS), split `train` or `test` (eval_im_names).
* a pair is in `train` when both images are in the train list, in `test` when both are in the eval
  list; other pairs (29 with the old eval list) are dropped as `pair_in_no_split`. query_id
  `shoes-<split>-<index>`, the index of the pair in relative_captions_shoes.json; text = the caption.
* the 27 pairs whose reference is their target are dropped (`reference_equals_target`: evaluation
  removes the reference from the gallery, so they cannot be hit); pairs with a missing image too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa

from stages.common.errors import StageError
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
    read_lines,
    record_error,
    report_missing_images,
    require_images_dir,
    select_queries,
    tables,
)
from stages.datasets.download import DownloadConfig
from stages.common.params import require, section
from stages.datasets.evaluation import Evaluation

EVALUATION = Evaluation(splits=("test",), protocols=("target",), ks=(1, 10, 50))  # VAL's Shoes table

PAIRS_FILE = "relative_captions_shoes.json"
TRAIN_NAMES_FILE = "train_im_names.txt"
EVAL_NAMES_FILE = "eval_im_names.txt"
CAPTIONS_FILE = "captions_shoes.json"
ANNOTATION_FILES = [PAIRS_FILE, TRAIN_NAMES_FILE, EVAL_NAMES_FILE, CAPTIONS_FILE]
# Manifest split of each name list; an image in both would go to the first (the lists are disjoint).
SPLIT_OF_LIST = {"test": EVAL_NAMES_FILE, "train": TRAIN_NAMES_FILE}
SPLIT_PRIORITY = ("test", "train")
NO_SPLIT = "pair_in_no_split"

# Counts read in the released annotation files
DOCUMENTED_PAIRS = 10_751
DOCUMENTED_NAMES = {TRAIN_NAMES_FILE: 10_000, EVAL_NAMES_FILE: 4_658}
DOCUMENTED_SPLIT_PAIRS = {"train": 8_990, "test": 1_761}
DOCUMENTED_CAPTIONS = 3_600

HOW_TO_GET_ANNOTATIONS = (
    "Shoes annotations: dataset/ of https://github.com/XiaoxiaoGuo/fashion-retrieval; put the files under "
    "raw_dir or set dataset.shoes.annotation_base_url to fetch them."
)
HOW_TO_GET_IMAGES = (
    "The Shoes images are the Berg et al. attribute dataset, attributedata.tar.gz, formerly at "
    "http://tamaraberg.com/attributesDataset/attributedata.tar.gz (dead since 2022; the authors do not "
    "redistribute it, use a copy you already have). Unpack it under dataset.shoes.images_dir: the "
    "img_womens_*.jpg files are found at any depth by name."
)


@section
class Config:
    raw_dir: str  # annotation files, e.g. data/raw/shoes
    images_dir: str  # the unpacked attributedata folder (manual download)
    annotation_base_url: str | None  # fetch the annotation files from <url>/<name>; None = already in raw_dir
    expect_full: bool  # assert the documented counts of the full dataset

    def __post_init__(self) -> None:
        require(bool(self.raw_dir), "raw_dir", "must not be empty")
        require(bool(self.images_dir), "images_dir", "must not be empty")


@dataclass(frozen=True)
class Pair:
    index: int  # position in relative_captions_shoes.json
    reference: str  # file name, e.g. img_womens_clogs_512.jpg
    target: str
    caption: str


def image_id(file_name: str) -> str:
    return PurePosixPath(file_name).stem


def parse_pairs(path: Path) -> list[Pair]:
    pairs = []
    for index, record in enumerate(expect_list(path, read_json(path), "pairs")):
        where = f"record {index}"
        if not isinstance(record, dict):
            raise record_error(path, where, f"expected an object, got {record!r}")
        target = expect_string(path, where, record.get("ImageName"), "ImageName")
        reference = expect_string(path, where, record.get("ReferenceImageName"), "ReferenceImageName")
        caption = record.get("RelativeCaption")
        if not isinstance(caption, str):
            raise record_error(path, where, f"'RelativeCaption' must be a string, got {caption!r}")
        pairs.append(Pair(index, reference, target, caption))
    return pairs


def parse_image_captions(path: Path) -> dict[str, str]:
    """File name -> caption; the first caption of a name wins."""
    captions: dict[str, str] = {}
    for index, record in enumerate(expect_list(path, read_json(path), "captions")):
        where = f"record {index}"
        if not isinstance(record, dict):
            raise record_error(path, where, f"expected an object, got {record!r}")
        name = expect_string(path, where, record.get("ImageName"), "ImageName")
        caption = record.get("Caption")
        if not isinstance(caption, str):
            raise record_error(path, where, f"'Caption' must be a string, got {caption!r}")
        captions.setdefault(name, caption.strip())
    return captions


def parse_names(path: Path) -> list[str]:
    names = read_lines(path)
    for number, name in enumerate(names, start=1):
        if "/" in name or "\\" in name or name in (".", ".."):
            raise record_error(path, f"name {number}", f"expected a file name, got {name!r}")
    return names


def pair_split(pair: Pair, image_split: dict[str, str]) -> str | None:
    """The split holding both images of the pair, or None."""
    split = image_split.get(pair.reference)
    return split if split is not None and image_split.get(pair.target) == split else None


def find_images(images_dir: Path, names: set[str]) -> dict[str, Path]:
    """File name -> path of every wanted name found below images_dir; a name found twice is an error."""
    found: dict[str, Path] = {}
    for path in sorted(images_dir.rglob("*")):
        if path.name in names and is_usable_file(path):
            if path.name in found:
                raise StageError(f"Shoes: image {path.name} is twice in {images_dir}: {found[path.name]} and {path}")
            found[path.name] = path
    return found


def build(cfg: Config, out_dir: Path, download: DownloadConfig) -> tuple[pa.Table, pa.Table]:
    """Read the annotations and the unpacked images, link the images into out_dir, return the manifests."""
    raw_dir, images_dir, out_dir = Path(cfg.raw_dir), Path(cfg.images_dir), Path(out_dir)
    report = IngestReport("shoes", raw_dir)
    files = annotation_files(raw_dir, ANNOTATION_FILES, {"": cfg.annotation_base_url}, download,
                             HOW_TO_GET_ANNOTATIONS)
    pairs = parse_pairs(report.annotation(files[PAIRS_FILE]))
    names = {split: parse_names(report.annotation(files[f])) for split, f in SPLIT_OF_LIST.items()}
    image_captions = parse_image_captions(report.annotation(files[CAPTIONS_FILE]))

    image_split = assign_image_splits(
        ((name, split) for split in SPLIT_PRIORITY for name in names[split]), SPLIT_PRIORITY
    )
    split_of_pair = {pair.index: pair_split(pair, image_split) for pair in pairs}
    if cfg.expect_full:
        check_count(files[PAIRS_FILE], "pairs", DOCUMENTED_PAIRS, len(pairs))
        for split, file_name in SPLIT_OF_LIST.items():
            check_count(files[file_name], "image names", DOCUMENTED_NAMES[file_name], len(names[split]))
            in_split = sum(1 for s in split_of_pair.values() if s == split)
            check_count(files[PAIRS_FILE], f"{split} pairs (both images in {file_name})",
                        DOCUMENTED_SPLIT_PAIRS[split], in_split)
        check_count(files[CAPTIONS_FILE], "image captions", DOCUMENTED_CAPTIONS, len(image_captions))

    require_images_dir("Shoes", images_dir, HOW_TO_GET_IMAGES)
    found = find_images(images_dir, set(image_split))
    missing = [name for name in image_split if name not in found]
    report_missing_images("Shoes", images_dir, missing, len(image_split), HOW_TO_GET_IMAGES)

    # Manifest ids are names without extension; the split lists and pairs use full file names.
    id_split = {image_id(name): split for name, split in image_split.items()}
    present = {image_id(name) for name in found}
    rows = [
        ImageRow(image_id(name), manifest_path(name, str(files[SPLIT_OF_LIST[split]])), split,
                 image_captions.get(name, ""), found.get(name, images_dir / name))
        for name, split in image_split.items()
    ]
    images = place_images(rows, present, out_dir, report)

    unsplit = [pair for pair in pairs if split_of_pair[pair.index] is None]
    report.extra["pairs_read"] = len(pairs)
    report.extra[NO_SPLIT] = {"count": len(unsplit), "first": [p.index for p in unsplit[:50]]}
    candidates = [
        Candidate(f"shoes-{split}-{pair.index:05d}", split, image_id(pair.reference), pair.caption.strip(),
                  image_id(pair.target))
        for pair in pairs
        if (split := split_of_pair[pair.index]) is not None
    ]
    queries = select_queries(candidates, id_split, present, report)
    report.write(out_dir)
    return tables(images, queries)
