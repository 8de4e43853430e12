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
caption-level recall of protocols.md §1 can be computed from the manifests alone.

An image whose png is missing is left out of images.parquet, and so is every query naming it;
`ingest_report.json` counts and lists both. With `expect_full` the counts of DATASETS.md §12 are checked.

The second half of this module holds the helpers that the MIT-States and Fashion200k adapters share
(download and safe extraction once, hard-linking images, the ingest report); they are candidates for
stages/datasets/common.py.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tarfile
import urllib.parse
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from stages.atomic import atomic_path, write_json
from stages.cli import StageError
from stages.download import DownloadConfig, Item, fetch_all, sha256_of, write_report
from stages.manifest import IMAGES_SCHEMA, QUERIES_SCHEMA
from stages.params import require, section

ANNOTATION_FILE = "css_toy_dataset_novel2_small.dup.npy"
DRIVE_URL = "https://drive.google.com/file/d/1wPqMw-HKmXUG2qTgYBiTNUnjz83hA2tY/view?usp=sharing"
SPLITS = ("train", "test")

# DATASETS.md §12 (third-party counts, [I]): checked only with expect_full.
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


def collect(annotation: dict[str, SplitAnnotation], images_dir: Path) -> _Ingest:
    """Every image with a png on disk, and every (from, to) pair of every mod whose two images exist."""
    ingest = _Ingest()
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
                    ingest.drop(qid, split, _MISSING_IMAGE, ", ".join(absent))
                else:
                    ingest.add_query(qid, split, image_id(split, source), mod.text, image_id(split, target))
    return ingest


def check_full_counts(annotation: dict[str, SplitAnnotation], ingest: _Ingest) -> None:
    """DATASETS.md §12: objects_img, mods and (from, to) pairs per split, and a png for every image."""
    for split in SPLITS:
        part = annotation[split]
        _check_count(ANNOTATION_FILE, f"{split} objects_img", EXPECTED_IMAGES[split], len(part.captions))
        _check_count(ANNOTATION_FILE, f"{split} mods", EXPECTED_MODS[split], len(part.mods))
        _check_count(ANNOTATION_FILE, f"{split} (from, to) pairs", EXPECTED_PAIRS[split], part.pair_count)
        missing = ingest.missing_images.get(split, [])
        _check_count("images/", f"{split} png files", len(part.captions), len(part.captions) - len(missing))


# ---------------------------------------------------------------- finding the raw data


def find_data_root(raw_dir: Path) -> Path | None:
    """The folder holding the annotation: raw_dir itself or the shallowest folder below it."""
    if not raw_dir.is_dir():
        return None
    found = sorted(
        (p for p in raw_dir.rglob(ANNOTATION_FILE) if not _is_junk(p.relative_to(raw_dir).as_posix())),
        key=lambda p: (len(p.parts), str(p)),
    )
    return found[0].parent if found else None


def obtain(cfg: Config, download: DownloadConfig) -> tuple[Path, dict | None]:
    """(data root, extraction record or None): with a URL, download and unpack CSS.zip once."""
    raw_dir = Path(cfg.raw_dir)
    extraction = None
    if cfg.archive_url is not None:
        extraction = _download_and_extract(cfg.archive_url, raw_dir, download, "download css3d")
    root = find_data_root(raw_dir)
    if root is None:
        how = (_not_in_archive_hint(cfg.archive_url, raw_dir) if cfg.archive_url is not None else
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
    _write_report(out_dir, {**report, "data_root": str(root), "archive": extraction, "images_copied_not_linked": copied})
    return ingest.tables()


# ================================================================ shared helpers
# Used by the css3d, mitstates and fashion200k adapters; candidates for stages/datasets/common.py.

_REPORT_FILE = "ingest_report.json"
_LISTED = 1000  # entries listed per report list (the report always has the full count)
_MISSING_IMAGE = "missing_image"  # a drop reason: the reference or target file is not on disk
_JUNK_PARTS = ("__MACOSX",)  # folders of macOS archives that hold no data


@dataclass
class _Ingest:
    """What an adapter collects before writing: the manifest rows, and what it had to leave out."""

    images: list[dict] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)
    sources: dict[str, Path] = field(default_factory=dict)  # image_id -> raw file to link
    missing_images: dict[str, list[str]] = field(default_factory=dict)  # split -> image ids without a file
    dropped: list[dict] = field(default_factory=list)  # {query_id, split, reason, detail}

    def add_image(self, source: Path, image_id: str, path: str, split: str, caption: str) -> bool:
        """Add the image if its file exists (True); else record it as missing (False)."""
        if not source.is_file():
            self.missing_images.setdefault(split, []).append(image_id)
            return False
        self.images.append({"image_id": image_id, "path": path, "split": split, "caption": caption})
        self.sources[image_id] = source
        return True

    def add_query(self, query_id: str, split: str, reference_id: str, text: str, target_id: str) -> None:
        self.queries.append(
            {"query_id": query_id, "split": split, "reference_id": reference_id, "text": text, "target_id": target_id}
        )

    def drop(self, query_id: str, split: str, reason: str, detail: str) -> None:
        self.dropped.append({"query_id": query_id, "split": split, "reason": reason, "detail": detail})

    def link_images(self, out_dir: Path, dataset: str) -> int:
        """Hard-link every image into out_dir (its `path`); returns how many had to be copied."""
        linker = _ImageLinker(out_dir)
        for row in tqdm(self.images, desc=f"link {dataset} images", unit="img", disable=None):
            linker.link(self.sources[row["image_id"]], row["path"])
        return linker.copied

    def tables(self) -> tuple[pa.Table, pa.Table]:
        return (pa.Table.from_pylist(self.images, schema=IMAGES_SCHEMA),
                pa.Table.from_pylist(self.queries, schema=QUERIES_SCHEMA))

    def report(self, dataset: str, raw_dir: Path, annotation_sha256: dict[str, str], splits: tuple[str, ...]) -> dict:
        """The ingest report, in the layout of stages/datasets/common.py's IngestReport: per split
        counts of images, missing images, queries read and kept, and drops by reason."""
        return {
            "dataset": dataset,
            "raw_dir": str(raw_dir),
            "annotation_sha256": dict(sorted(annotation_sha256.items())),
            "splits": {split: self._split_report(split) for split in sorted(splits)},
            "dropped_queries": _listed(self.dropped),
        }

    def _split_report(self, split: str) -> dict:
        kept = sum(1 for row in self.queries if row["split"] == split)
        reasons = Counter(row["reason"] for row in self.dropped if row["split"] == split)
        missing = self.missing_images.get(split, [])
        return {
            "images": sum(1 for row in self.images if row["split"] == split),
            "missing_images": {"count": len(missing), "first": missing[:_LISTED]},
            "queries_read": kept + sum(reasons.values()),
            "queries_kept": kept,
            "dropped": dict(sorted(reasons.items())),
        }


def _listed(items: list) -> dict:
    return {"count": len(items), "first": items[:_LISTED]}


def _write_report(out_dir: Path, report: dict) -> None:
    write_json(Path(out_dir) / _REPORT_FILE, report)


def _check_count(file: str, what: str, expected: int, found: int) -> None:
    """With expect_full: the documented count of the full dataset, or a StageError naming all three."""
    if expected != found:
        raise StageError(
            f"{file}: {what}: expected {expected:,} (the full dataset), found {found:,}; "
            f"set expect_full: false to build from a partial copy"
        )


def _safe_relative_path(path: str, where: str) -> PurePosixPath:
    """`path` as a relative POSIX path that stays inside its folder; else a StageError naming `where`."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts:
        raise StageError(f"{where}: path {path!r} must be relative and must not contain '..'")
    return pure


class _ImageLinker:
    """Puts dataset images into out_dir by hard link: no copy, no extra disk. When the raw data is on
    another filesystem (EXDEV) it copies instead, and says so once."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.copied = 0
        self._made_dirs: set[Path] = set()

    def link(self, source: Path, relative_path: str) -> None:
        dest = self.out_dir / relative_path
        if dest.parent not in self._made_dirs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(dest.parent)
        try:
            os.link(source, dest)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            if self.copied == 0:
                print(f"note: {source.parent} and {self.out_dir} are on different filesystems; "
                      f"copying the images instead of hard-linking them", file=sys.stderr)
            shutil.copyfile(source, dest)
            self.copied += 1


# ---------------------------------------------------------------- downloads and archives


def _url_file_name(url: str) -> str:
    """The last path segment of `url` (`.../CSS.zip` -> `CSS.zip`)."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    if not name:
        raise StageError(f"{url}: the URL names no file")
    return name


def _download_file(url: str, dest: Path, download: DownloadConfig, desc: str) -> None:
    """Fetch `url` to `dest` with stages.download; a failure is a StageError. The download report
    goes beside `dest` (in raw_dir), so that prepare's output does not depend on the first run."""
    results = fetch_all([Item(url=url, dest=dest)], download, desc=desc)
    write_report(dest.with_name(f".{dest.name}.download.json"), results)
    if not results[0].ok:
        raise StageError(f"{url}: download to {dest} {results[0].status}: {results[0].error}")


def _marker(archive: Path) -> Path:
    """The file whose presence says `archive` was fully extracted; it records what happened."""
    return archive.with_name(f".{archive.name}.extracted.json")


def _download_and_extract(url: str, raw_dir: Path, download: DownloadConfig, desc: str) -> dict:
    """Download the archive at `url` into raw_dir and extract it there, both once: when the marker of a
    finished extraction exists nothing is requested or unpacked again. Returns the marker's record."""
    archive = raw_dir / _url_file_name(url)
    if not _marker(archive).exists():
        raw_dir.mkdir(parents=True, exist_ok=True)
        _download_file(url, archive, download, desc)
    return _extract_once(archive, raw_dir, url)


def _not_in_archive_hint(url: str, raw_dir: Path) -> str:
    """What to say when data expected from the archive at `url` is not in raw_dir."""
    marker = _marker(raw_dir / _url_file_name(url))
    return (f"the archive {url} does not hold it, or its extracted files were removed since "
            f"(delete {marker} to extract the archive again)")


def _extract_once(archive: Path, dest: Path, url: str | None = None) -> dict:
    """Extract a zip or a tar(.gz) into `dest` unless its marker says that was done; returns the record
    {archive, url, sha256, members, unreadable_members}. Members under __MACOSX/ are skipped. A zip
    member whose data is corrupt (bad CRC) is skipped and listed: MIT-States' zip is reported partly
    corrupt (DATASETS.md §3), and losing a few images should not lose the dataset."""
    marker = _marker(archive)
    if marker.exists():
        return json.loads(marker.read_text())
    print(f"extract {archive} -> {dest}", file=sys.stderr)
    if zipfile.is_zipfile(archive):
        members, unreadable = _extract_zip(archive, dest)
    elif tarfile.is_tarfile(archive):
        members, unreadable = _extract_tar(archive, dest), []
    else:
        raise StageError(f"{archive}: neither a zip nor a tar archive (a truncated download? delete it to refetch)")
    record = {"archive": archive.name, "url": url, "sha256": sha256_of(archive), "members": members,
              "unreadable_members": unreadable}
    write_json(marker, record)
    return record


def _is_junk(name: str) -> bool:
    return any(part in _JUNK_PARTS for part in PurePosixPath(name).parts)


def _extract_zip(archive: Path, dest: Path) -> tuple[int, list[str]]:
    """Check every member name first (nothing is written when one would leave `dest`), then extract,
    each file atomically."""
    with zipfile.ZipFile(archive) as zf:
        infos = [info for info in zf.infolist() if not _is_junk(info.filename)]
        for info in infos:
            _safe_relative_path(info.filename, f"{archive}: member")
        unreadable = []
        for info in tqdm(infos, desc=f"extract {archive.name}", unit="file", disable=None):
            target = dest / info.filename
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as source, atomic_path(target) as tmp, open(tmp, "wb") as sink:
                    shutil.copyfileobj(source, sink)
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                print(f"extract {archive.name}: skipping unreadable member {info.filename}: {err}", file=sys.stderr)
                unreadable.append(info.filename)
    return len(infos), unreadable


def _extract_tar(archive: Path, dest: Path) -> int:
    """tarfile's 'data' filter refuses absolute paths, `..`, links leaving `dest` and device files;
    every member is checked before anything is written."""
    try:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if not _is_junk(m.name)]
            for member in members:
                tarfile.data_filter(member, str(dest))
            tf.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as err:
        raise StageError(f"{archive}: a member would be written outside {dest}: {err}") from None
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise StageError(f"{archive}: unreadable tar archive ({err}); delete it to refetch") from None
    return len(members)
