"""CSS3D, the synthetic "CSS" dataset of TIRG: rendered 3D scenes of objects, edited by one instruction.

Source (google/tirg README and download_script.sh): the archive `CSS.zip` at `archive_url`, or by
hand from Google Drive (DRIVE_URL). Either way `raw_dir` ends up holding, at its top or further down,
    css_toy_dataset_novel2_small.dup.npy      a pickled dict inside a .npy (Python 2 pickle)
    images/css_{split}_{idx:06d}.png           one rendered image per scene

This adapter follows google/tirg datasets.py `CSSDataset`:
  * the annotation is `{'train': ..., 'test': ...}`; in a split, `objects_img[i]` is the scene of
    image `i` (= css_{split}_{i:06d}.png) and `labels[i]`, when the split has `labels`, is its scene
    label (duplicated scenes share a label); without `labels` the label is `i`. The image caption is
    `str(label)`, as TIRG's `captions` are.
  * queries (`generate_test_queries_`): for every mod, for every k, the pair (from[k], to[k]) with
    text `to_str`. TIRG enumerates this for test and samples the same pairs at random for training;
    here train gets the same full enumeration, so its manifest holds every pair once.
  * every image of a split is in the gallery, the ~39 scenes without objects too.

Multiple correct targets: TIRG counts a retrieved image as correct when its caption (the scene label)
equals the target's, so duplicates of the target scene count too. The manifest has one target_id per
query, the `to` image of the pair; the label is each image's `caption` in images.parquet, so the
caption-level recall of google/tirg's test_retrieval.py can be computed from the manifests alone.

An image whose png is missing is left out of images.parquet, and so is every query naming it;
`ingest_report.json` counts and lists both. With `expect_full` the documented counts of the full dataset are checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from stages.common.errors import StageError
from stages.datasets.archives import download_and_extract, is_junk, not_in_archive_hint
from stages.datasets.common import MISSING_IMAGE, Ingest, check_count, write_ingest_report
from stages.datasets.download import DownloadConfig, sha256_of
from stages.common.params import require, section
from stages.datasets.evaluation import Evaluation

EVALUATION = Evaluation(splits=("test",), protocols=("caption",), ks=(1, 5, 10, 50))  # TIRG / GA on CSS3D

ANNOTATION_FILE = "css_toy_dataset_novel2_small.dup.npy"
DRIVE_URL = "https://drive.google.com/file/d/1wPqMw-HKmXUG2qTgYBiTNUnjz83hA2tY/view?usp=sharing"
SPLITS = ("train", "test")

# Third-party counts of the full dataset, not verified here: checked only with expect_full.
EXPECTED_IMAGES = {"train": 19_012, "test": 19_057}
EXPECTED_MODS = {"train": 6_004, "test": 6_019}
EXPECTED_PAIRS = {"train": 18_012, "test": 18_057}


@section
class Config:
    raw_dir: str  # where the raw data is, or is downloaded to, e.g. data/raw/css3d
    archive_url: str | None  # CSS.zip; None: the data is already unpacked in raw_dir
    expect_full: bool  # check the documented counts of the full dataset

    def __post_init__(self) -> None:
        require(bool(self.raw_dir), "raw_dir", "must not be empty")


@dataclass(frozen=True)
class Mod:
    text: str  # TIRG's `to_str`
    pairs: tuple[tuple[int, int], ...]  # (from image index, to image index)


@dataclass(frozen=True)
class SplitAnnotation:
    captions: tuple[str, ...]  # str(scene label) of each image index
    mods: tuple[Mod, ...]
    objectless: int  # images whose scene has no object

    @property
    def pair_count(self) -> int:
        return sum(len(mod.pairs) for mod in self.mods)


# ---------------------------------------------------------------- reading the annotation


def load_annotation(path: Path) -> dict[str, SplitAnnotation]:
    """Read and check the pickled annotation; a malformed record is a StageError naming it."""
    data = _unpickle(path)
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a dict of splits, found {type(data).__name__}")
    return {split: _split_annotation(path, split, data) for split in SPLITS}


def _unpickle(path: Path) -> Any:
    """The object inside the .npy. TIRG calls `np.load(path).item()` under Python 2; Python 3 needs
    allow_pickle, and latin1 for the Python 2 strings. Unpickling runs code from the file, so read
    only the official annotation (its sha256 goes into the ingest report)."""
    try:
        loaded = np.load(path, allow_pickle=True, encoding="latin1")
    except Exception as err:  # a truncated or foreign file fails inside numpy, pickle or an import
        raise StageError(f"{path}: not a readable pickled .npy file ({type(err).__name__}: {err})") from None
    if isinstance(loaded, np.ndarray) and loaded.dtype == object and loaded.shape == ():
        return loaded.item()
    return loaded


def _split_annotation(path: Path, split: str, data: dict) -> SplitAnnotation:
    where = f"{path}: split {split!r}"
    part = data.get(split)
    if not isinstance(part, dict):
        raise StageError(f"{where}: missing or not a dict (top-level keys: {sorted(map(str, data))})")
    for key in ("objects_img", "mods"):
        if key not in part:
            raise StageError(f"{where}: missing key {key!r}")
    objects_img = list(part["objects_img"])
    count = len(objects_img)
    if "labels" in part:
        labels = list(part["labels"])
        if len(labels) != count:
            raise StageError(f"{where}: {len(labels)} labels for {count} images in objects_img")
    else:
        labels = list(range(count))  # TIRG: label = the image index
    mods = tuple(_mod(f"{where}: mods[{i}]", mod, count) for i, mod in enumerate(part["mods"]))
    objectless = sum(1 for objects in objects_img if len(objects) == 0)
    return SplitAnnotation(tuple(_text(label) for label in labels), mods, objectless)


def _mod(where: str, mod: Any, image_count: int) -> Mod:
    if not isinstance(mod, dict):
        raise StageError(f"{where}: expected a dict with 'from', 'to', 'to_str', found {type(mod).__name__}")
    for key in ("from", "to", "to_str"):
        if key not in mod:
            raise StageError(f"{where}: missing key {key!r}")
    sources, targets = list(mod["from"]), list(mod["to"])
    if len(sources) != len(targets):
        raise StageError(f"{where}: 'from' lists {len(sources)} images but 'to' lists {len(targets)}")
    for index in sources + targets:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < image_count:
            raise StageError(f"{where}: image index {index!r} is not in 0..{image_count - 1}")
    text = _text(mod["to_str"]).strip()
    if not text:
        raise StageError(f"{where}: empty 'to_str'")
    return Mod(text, tuple((int(f), int(t)) for f, t in zip(sources, targets)))


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------- images and queries


def image_name(split: str, index: int) -> str:
    """TIRG's file name of image `index` of `split` (`'/css_%s_%06d.png' % (split, idx)`)."""
    return f"css_{split}_{index:06d}.png"


def image_id(split: str, index: int) -> str:
    return f"css_{split}_{index:06d}"


def query_id(split: str, mod_index: int, pair_index: int) -> str:
    """Names the mod and the pair, so an id stays the same when other queries are dropped."""
    return f"{split}-{mod_index:06d}-{pair_index:02d}"


def collect(annotation: dict[str, SplitAnnotation], images_dir: Path) -> Ingest:
    """Every image with a png on disk, and every (from, to) pair of every mod whose two images exist."""
    ingest = Ingest()
    for split in SPLITS:
        part = annotation[split]
        present = set()
        for index, caption in enumerate(part.captions):
            name = image_name(split, index)
            if ingest.add_image(images_dir / name, image_id(split, index), f"images/{name}", split, caption):
                present.add(index)
        for mod_index, mod in enumerate(part.mods):
            for pair_index, (source, target) in enumerate(mod.pairs):
                qid = query_id(split, mod_index, pair_index)
                absent = [image_id(split, i) for i in (source, target) if i not in present]
                if absent:
                    ingest.drop(qid, split, MISSING_IMAGE, ", ".join(absent))
                else:
                    ingest.add_query(qid, split, image_id(split, source), mod.text, image_id(split, target))
    return ingest


def check_full_counts(annotation: dict[str, SplitAnnotation], ingest: Ingest) -> None:
    """The documented counts: objects_img, mods and (from, to) pairs per split, and a png for every image."""
    for split in SPLITS:
        part = annotation[split]
        check_count(ANNOTATION_FILE, f"{split} objects_img", EXPECTED_IMAGES[split], len(part.captions))
        check_count(ANNOTATION_FILE, f"{split} mods", EXPECTED_MODS[split], len(part.mods))
        check_count(ANNOTATION_FILE, f"{split} (from, to) pairs", EXPECTED_PAIRS[split], part.pair_count)
        missing = ingest.missing_images.get(split, [])
        check_count("images/", f"{split} png files", len(part.captions), len(part.captions) - len(missing))


# ---------------------------------------------------------------- finding the raw data


def find_data_root(raw_dir: Path) -> Path | None:
    """The folder holding the annotation: raw_dir itself or the shallowest folder below it."""
    if not raw_dir.is_dir():
        return None
    found = sorted(
        (p for p in raw_dir.rglob(ANNOTATION_FILE) if not is_junk(p.relative_to(raw_dir).as_posix())),
        key=lambda p: (len(p.parts), str(p)),
    )
    return found[0].parent if found else None


def obtain(cfg: Config, download: DownloadConfig) -> tuple[Path, dict | None]:
    """(data root, extraction record or None): with a URL, download and unpack CSS.zip once."""
    raw_dir = Path(cfg.raw_dir)
    extraction = None
    if cfg.archive_url is not None:
        extraction = download_and_extract(cfg.archive_url, raw_dir, download, "download css3d")
    root = find_data_root(raw_dir)
    if root is None:
        how = (not_in_archive_hint(cfg.archive_url, raw_dir) if cfg.archive_url is not None else
               f"download CSS.zip by hand from {DRIVE_URL} (Google Drive needs a browser) and unzip it into "
               f"{raw_dir}, or set archive_url to a URL of CSS.zip")
        raise StageError(f"{raw_dir}: missing {ANNOTATION_FILE} (looked in {raw_dir} and below); {how}")
    if not (root / "images").is_dir():
        raise StageError(f"{root / 'images'}: missing (the folder of CSS3D's css_<split>_NNNNNN.png images)")
    return root, extraction


def build(cfg: Config, out_dir: Path, download: DownloadConfig) -> tuple[pa.Table, pa.Table]:
    """Link the CSS3D pngs into out_dir/images, write out_dir/ingest_report.json, return the manifests."""
    out_dir = Path(out_dir)
    root, extraction = obtain(cfg, download)
    annotation_path = root / ANNOTATION_FILE
    annotation = load_annotation(annotation_path)
    ingest = collect(annotation, root / "images")
    if cfg.expect_full:
        check_full_counts(annotation, ingest)
    copied = ingest.link_images(out_dir, "css3d")
    report = ingest.report("css3d", Path(cfg.raw_dir), {ANNOTATION_FILE: sha256_of(annotation_path)}, SPLITS)
    for split in SPLITS:
        part = annotation[split]
        report["splits"][split].update(
            images_in_annotation=len(part.captions), images_without_objects=part.objectless,
            mods=len(part.mods), pairs=part.pair_count,
        )
    write_ingest_report(out_dir, {**report, "data_root": str(root), "archive": extraction, "images_copied_not_linked": copied})
    return ingest.tables()
