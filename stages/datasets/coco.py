"""MS-COCO 2014 with Karpathy's splits, for image-text matching.

Inputs:
    <raw_dir>/dataset_coco.json      Karpathy's split file (see stages.datasets.karpathy for where it may
                                     come from and how its records become rows)
    <images_dir>/train2014/*.jpg     the COCO 2014 images, as unpacked from train2014.zip and val2014.zip;
    <images_dir>/val2014/*.jpg       with `download_images: true` those zips are fetched into raw_dir
                                     (from `image_zip_url`) and unpacked once into images_dir

Outputs in the prepared folder (besides images.parquet, whose caption is each image's first caption,
and an empty queries.parquet):
    images/<train2014|val2014>/<filename>   hard links to the source files (copies across filesystems)
    captions.parquet   every kept caption (stages.datasets.captions): 5 per image by default, caption_id = sentid
    folds.json         {"0": [image_id, ...], ..., "4": [...]}: the COCO 1K protocol. The 5,000 test
                       images in Karpathy order (= SCAN testall order) cut into `folds` consecutive
                       folds of 1,000; metrics are computed per fold and averaged. COCO 5K = the whole
                       test split. Fold boundaries are fixed by Karpathy positions, so an image left
                       out (on_missing: drop) only shrinks its own fold.
    ingest_report.json counts per split, missing images, sha256 of the annotation file and of the
                       image zips when downloaded

Karpathy's `test` images come from val2014 (not test2014); `restval` (30,504 val2014 images) joins
train unless `restval_as_train: false`.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path, PurePosixPath

import pyarrow as pa
from pydantic import Field
from tqdm import tqdm
from typing_extensions import Annotated

from stages.common.atomic import write_json
from stages.common.errors import StageError
from stages.datasets.captions import FOLDS_FILE
from stages.datasets import karpathy
from stages.datasets.karpathy import OnMissing, Record
from stages.datasets.download import DownloadConfig, Item, sha256_of
from stages.common.params import require, section
from stages.datasets.evaluation import Evaluation

EVALUATION = Evaluation(splits=("test",), validation="val")  # image-text matching: COCO 5K and, from folds.json, 1K

DATASET = karpathy.Dataset(
    name="coco",
    json_name="dataset_coco.json",
    has_folders=True,
    expected_counts={"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000},
    mirror_sha256="af76e819987c9ced8452fdb4da823524e033f7baa097cf40bab83bdab4c469ea",
    images_help=(
        "get them from http://images.cocodataset.org/zips/{train2014,val2014}.zip and unpack them into "
        "images_dir, or set download_images: true"
    ),
)
IMAGE_ZIP_URL = "http://images.cocodataset.org/zips/{name}.zip"


@section
class Config:
    raw_dir: str = "data/raw/coco"
    karpathy_url: str | None = None
    images_dir: str = "data/raw/coco/images"
    download_images: bool = False
    image_zip_url: str = IMAGE_ZIP_URL
    restval_as_train: bool = True
    captions_per_image: Annotated[int, Field(ge=0)] = 5
    on_missing: OnMissing = "error"
    expect_full: bool = False
    folds: Annotated[int, Field(ge=0)] = 5

    def __post_init__(self) -> None:
        require("{name}" in self.image_zip_url, "image_zip_url",
                f"must contain {{name}} (train2014 / val2014), got {self.image_zip_url!r}")


# ---------------------------------------------------------------- image zips


def _marker(images_dir: Path, archive: Path) -> Path:
    return images_dir / f".{archive.name}.extracted.json"


def _unchanged_since_extraction(marker: Path, archive: Path) -> dict | None:
    """The marker's record when `archive` was already unpacked and has not changed since."""
    if not marker.exists():
        return None
    record = json.loads(marker.read_text())
    stat = archive.stat()
    if record.get("bytes") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
        return record
    return None


def _check_members(zf: zipfile.ZipFile, archive: Path) -> list[zipfile.ZipInfo]:
    members = zf.infolist()
    for info in members:
        parts = PurePosixPath(info.filename).parts
        if PurePosixPath(info.filename).is_absolute() or ".." in parts:
            raise StageError(f"{archive}: member {info.filename!r} would land outside the images folder")
    return members


def extract_once(archive: Path, images_dir: Path) -> dict:
    """Unpack `archive` into `images_dir` unless that was done already for this very file; returns
    {"bytes", "sha256"} of the archive (hashed once, at extraction, and kept in a marker file)."""
    marker = _marker(images_dir, archive)
    done = _unchanged_since_extraction(marker, archive)
    if done is None:
        try:
            with zipfile.ZipFile(archive) as zf:
                for info in tqdm(_check_members(zf, archive), desc=f"unzip {archive.name}", unit="file", disable=None):
                    zf.extract(info, images_dir)
        except zipfile.BadZipFile as err:
            raise StageError(f"{archive}: not a readable zip ({err}); delete it and run again") from None
        stat = archive.stat()
        done = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_of(archive)}
        write_json(marker, done)
    return {"bytes": done["bytes"], "sha256": done["sha256"]}


def image_folders(records: list[Record]) -> list[str]:
    """The sub-folders (zip names) the records' files live in, e.g. ['train2014', 'val2014']."""
    return sorted({PurePosixPath(r.source).parts[0] for r in records})


def download_images(cfg: Config, records: list[Record], download: DownloadConfig) -> dict[str, dict]:
    """Fetch the zips the records need into raw_dir, unpack each once; {zip name: bytes, sha256}."""
    raw_dir, images_dir = Path(cfg.raw_dir), Path(cfg.images_dir)
    items = [
        Item(cfg.image_zip_url.format(name=folder), raw_dir / f"{folder}.zip") for folder in image_folders(records)
    ]
    karpathy.fetch_or_fail(items, download, "coco image zips")
    return {item.dest.name: extract_once(item.dest, images_dir) for item in items}


# ---------------------------------------------------------------- 1K folds


def one_k_folds(records: list[Record], kept_ids: set[str], folds: int) -> tuple[dict[str, list[str]], list[str]]:
    """({fold: image_ids}, left-over ids): the Karpathy test images, in order, cut into `folds` equal
    consecutive folds; images not in `kept_ids` are left out of their fold."""
    test_ids = [r.image_id for r in records if r.split == "test"]
    size = len(test_ids) // folds
    if size == 0:
        raise StageError(f"coco: cannot cut {len(test_ids)} test images into {folds} folds; set folds: 0")
    by_fold = {
        str(k): [i for i in test_ids[k * size : (k + 1) * size] if i in kept_ids] for k in range(folds)
    }
    return by_fold, test_ids[folds * size :]


# ---------------------------------------------------------------- build


def build(cfg: Config, out_dir: Path, download: DownloadConfig) -> tuple[pa.Table, pa.Table]:
    """Ingest COCO-Karpathy into `out_dir` (see the module doc); returns (images, empty queries)."""
    out_dir = Path(out_dir)
    annotation = karpathy.load(DATASET, cfg, download)
    archives = download_images(cfg, annotation.records, download) if cfg.download_images else {}
    ingested = karpathy.ingest(DATASET, annotation, cfg, out_dir)
    report = karpathy.report(DATASET, annotation, ingested, cfg)
    report["image_archives"] = archives
    if cfg.folds:
        kept = set(ingested.images.column("image_id").to_pylist())
        folds, left_over = one_k_folds(annotation.records, kept, cfg.folds)
        write_json(out_dir / FOLDS_FILE, folds)
        report["folds"] = {
            "count": cfg.folds,
            "images": {fold: len(ids) for fold, ids in folds.items()},
            "left_over": left_over,
        }
    karpathy.write_outputs(out_dir, ingested, report)
    return ingested.images, karpathy.empty_queries()
