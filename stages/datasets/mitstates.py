"""MIT-States (Isola et al., CVPR 2015) as TIRG uses it: change the state (adjective) of an object.

Source: `release_dataset.zip` at `archive_url`, or by hand from the project page
(PROJECT_URL), unzipped into `raw_dir`. The only annotation is the folder layout:
    raw_dir/release_dataset/images/<adj> <noun>/*.jpg     (or raw_dir/images/...)
Folder names hold a space ("ancient building"); `adj <noun>` folders hold images without a state.

This adapter follows google/tirg datasets.py `MITStates`:
  * only folders whose name holds a space are read, as `adj, noun = name.split()`; folders whose
    adjective is the literal `adj` are skipped; every file in a folder must end with 'jpg' (TIRG
    asserts; hidden files such as .DS_Store are skipped here);
  * the split is by noun: the 49 hard-coded TEST_NOUNS are test, every other noun is train;
  * an image's caption is "adj noun"; every noun must have images of at least two adjectives (TIRG
    asserts it in `caption_index_init_`);
  * test queries (`generate_test_queries_`): every test image, with every other adjective of its noun;
    the text is the target adjective and the target caption is "<target adj> <noun>";
  * training (`caption_index_sample_`, `__getitem__`): a source image, a target adjective of its noun,
    and a random image of "<target adj> <noun>" as target, text = the target adjective; TIRG draws two
    targets of different adjectives per source.

What the manifest fixes, since it holds one row per query where TIRG samples on the fly:
  * test target_id: the first image, in sorted file-name order, of the target caption. TIRG counts
    any image with that caption as correct; the caption is in images.parquet, so caption-level recall
    (google/tirg test_retrieval.py) is computed from the manifests.
  * train: for every train image, `train_queries_per_image` distinct adjectives of its noun other than
    its own, drawn with `seed`, each with a random image of that caption as target. TIRG may also draw
    the source's own adjective (an edit that changes nothing); every query here asks for a change.
  * image_id: "<folder>/<file>" exactly as on disk (spaces and case kept); path: images/<folder>/<file>.
"""
from __future__ import annotations

import hashlib
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from stages.common.errors import StageError
from stages.datasets.archives import download_and_extract, not_in_archive_hint
from stages.datasets.common import Ingest, listed, write_ingest_report
from stages.datasets.download import DownloadConfig
from stages.common.params import require, section
from stages.datasets.evaluation import Evaluation

EVALUATION = Evaluation(splits=("test",), protocols=("caption",), ks=(1, 5, 10))  # TIRG's MIT-States table

PROJECT_URL = "http://web.mit.edu/phillipi/Public/states_and_transformations/index.html"
# google/tirg datasets.py MITStates.__init__: the nouns of the test split.
TEST_NOUNS = frozenset({
    "armor", "bracelet", "bush", "camera", "candy", "castle", "ceramic", "cheese", "clock", "clothes",
    "coffee", "fan", "fig", "fish", "foam", "forest", "fruit", "furniture", "garden", "gate", "glass",
    "horse", "island", "laptop", "lead", "lightning", "mirror", "orange", "paint", "persimmon",
    "plastic", "plate", "potato", "road", "rubber", "sand", "shell", "sky", "smoke", "steel", "stream",
    "table", "tea", "tomato", "vacuum", "wax", "wheel", "window", "wool",
})  # fmt: skip
SPLITS = ("train", "test")
UNLABELLED_ADJECTIVE = "adj"  # folders "adj <noun>": images without a state, skipped by TIRG
# Where the images folder may be, relative to raw_dir: the zip unpacks to release_dataset/.
IMAGES_DIRS = ("release_dataset/images", "images")


@section
class Config:
    raw_dir: str  # where the raw data is, or is downloaded to, e.g. data/raw/mitstates
    archive_url: str | None  # release_dataset.zip; None: already unpacked in raw_dir
    expect_full: bool  # check that every one of the 49 test nouns has images
    seed: int  # draws the training queries
    train_queries_per_image: int  # distinct other adjectives per training image (TIRG draws 2 per source)

    def __post_init__(self) -> None:
        require(bool(self.raw_dir), "raw_dir", "must not be empty")
        require(self.train_queries_per_image > 0, "train_queries_per_image",
                f"must be > 0, got {self.train_queries_per_image}")


@dataclass(frozen=True)
class StateImage:
    folder: str  # "<adj> <noun>", as on disk
    file: str
    adj: str
    noun: str

    @property
    def image_id(self) -> str:
        return f"{self.folder}/{self.file}"

    @property
    def caption(self) -> str:
        return f"{self.adj} {self.noun}"

    @property
    def split(self) -> str:
        return "test" if self.noun in TEST_NOUNS else "train"


@dataclass
class Scan:
    images: list[StateImage] = field(default_factory=list)  # sorted by folder, then file
    skipped_folders: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> names
    hidden_files: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading the folders


def find_images_dir(cfg: Config, download: DownloadConfig) -> tuple[Path, dict | None]:
    """(images folder, extraction record or None): with a URL, download and unpack the zip once."""
    raw_dir = Path(cfg.raw_dir)
    extraction = None
    if cfg.archive_url is not None:
        extraction = download_and_extract(cfg.archive_url, raw_dir, download, "download mitstates")
    for relative in IMAGES_DIRS:
        if (raw_dir / relative).is_dir():
            return raw_dir / relative, extraction
    how = (not_in_archive_hint(cfg.archive_url, raw_dir) if cfg.archive_url is not None else
           f"download release_dataset.zip from {PROJECT_URL} and unzip it into {raw_dir}, "
           f"or set archive_url to a URL of release_dataset.zip")
    raise StageError(f"{raw_dir}: missing the images folder ({' or '.join(IMAGES_DIRS)}, "
                     f"holding '<adj> <noun>/*.jpg'); {how}")


def scan_images(images_dir: Path) -> Scan:
    """Every image of every '<adj> <noun>' folder, as TIRG lists them (sorted here, for determinism)."""
    scan = Scan()
    for name in sorted(os.listdir(images_dir)):
        folder = images_dir / name
        if " " not in name:
            scan.skipped_folders["name without a space"].append(name)
            continue
        if not folder.is_dir():
            scan.skipped_folders["not a folder"].append(name)
            continue
        words = name.split()
        if len(words) != 2:
            raise StageError(f"{folder}: folder name {name!r} is not '<adjective> <noun>' (two words)")
        adj, noun = words
        if adj == UNLABELLED_ADJECTIVE:
            scan.skipped_folders["'adj <noun>': no state label"].append(name)
            continue
        for file in sorted(os.listdir(folder)):
            if file.startswith("."):
                scan.hidden_files.append(f"{name}/{file}")
                continue
            if not file.endswith("jpg") or not (folder / file).is_file():
                raise StageError(f"{folder / file}: not a .jpg image (google/tirg asserts that every file of an "
                                 f"'<adj> <noun>' folder ends with 'jpg')")
            scan.images.append(StateImage(name, file, adj, noun))
    return scan


def adjectives_by_noun(images: list[StateImage], images_dir: Path) -> dict[str, list[str]]:
    """noun -> its adjectives, sorted; a noun with one adjective is a StageError (TIRG asserts >= 2)."""
    adjectives: dict[str, set[str]] = defaultdict(set)
    for image in images:
        adjectives[image.noun].add(image.adj)
    for noun, adjs in sorted(adjectives.items()):
        if len(adjs) < 2:
            raise StageError(f"{images_dir}: noun {noun!r} has images of one adjective only ('{min(adjs)} {noun}'); "
                             f"google/tirg asserts at least two per noun, since a query changes the adjective")
    return {noun: sorted(adjs) for noun, adjs in sorted(adjectives.items())}


def check_test_nouns(images: list[StateImage], images_dir: Path) -> None:
    """With expect_full: every one of TIRG's 49 test nouns has images."""
    missing = sorted(TEST_NOUNS - {image.noun for image in images})
    if missing:
        raise StageError(f"{images_dir}: test nouns: expected images of all {len(TEST_NOUNS)} test nouns of "
                         f"google/tirg, found {len(TEST_NOUNS) - len(missing)} (missing: {', '.join(missing)}); "
                         f"set expect_full: false to build from a partial copy")


# ---------------------------------------------------------------- queries


def collect(scan: Scan, images_dir: Path, seed: int, per_image: int) -> Ingest:
    """All images, then test queries as TIRG enumerates them and seeded training queries."""
    adjectives = adjectives_by_noun(scan.images, images_dir)
    by_caption: dict[str, list[StateImage]] = defaultdict(list)
    ingest = Ingest()
    for image in scan.images:
        by_caption[image.caption].append(image)
        ingest.add_image(images_dir / image.folder / image.file, image.image_id,
                         f"images/{image.image_id}", image.split, image.caption)
    test = [image for image in scan.images if image.split == "test"]
    for number, (image, adj) in enumerate(
        (image, adj) for image in test for adj in adjectives[image.noun] if adj != image.adj
    ):
        target = by_caption[f"{adj} {image.noun}"][0]
        ingest.add_query(f"test-{number:06d}", "test", image.image_id, adj, target.image_id)
    rng = random.Random(seed)
    number = 0
    for image in (image for image in scan.images if image.split == "train"):
        others = [adj for adj in adjectives[image.noun] if adj != image.adj]
        for adj in rng.sample(others, min(per_image, len(others))):
            target = rng.choice(by_caption[f"{adj} {image.noun}"])
            ingest.add_query(f"train-{number:06d}", "train", image.image_id, adj, target.image_id)
            number += 1
    return ingest


def listing_sha256(images: list[StateImage]) -> str:
    """MIT-States has no annotation file: the sha256 of its sorted image list stands for one."""
    return hashlib.sha256("\n".join(image.image_id for image in images).encode("utf-8")).hexdigest()


def build(cfg: Config, out_dir: Path, download: DownloadConfig) -> tuple[pa.Table, pa.Table]:
    """Link the MIT-States images into out_dir/images, write out_dir/ingest_report.json, return the manifests."""
    out_dir = Path(out_dir)
    images_dir, extraction = find_images_dir(cfg, download)
    scan = scan_images(images_dir)
    if cfg.expect_full:
        check_test_nouns(scan.images, images_dir)
    ingest = collect(scan, images_dir, cfg.seed, cfg.train_queries_per_image)
    copied = ingest.link_images(out_dir, "mitstates")
    report = ingest.report("mitstates", Path(cfg.raw_dir), {}, SPLITS)
    for split in SPLITS:
        images = [image for image in scan.images if image.split == split]
        report["splits"][split].update(
            nouns=len({image.noun for image in images}), captions=len({image.caption for image in images})
        )
    write_ingest_report(out_dir, {
        **report,
        "data_root": str(images_dir),
        "archive": extraction,
        "listing_sha256": listing_sha256(scan.images),
        "adjectives": len({image.adj for image in scan.images}),
        "skipped_folders": {reason: listed(names) for reason, names in sorted(scan.skipped_folders.items())},
        "hidden_files_skipped": listed(scan.hidden_files),
        "images_copied_not_linked": copied,
    })
    return ingest.tables()
