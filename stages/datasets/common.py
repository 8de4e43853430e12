"""Helpers shared by the adapters of real datasets (FashionIQ, Shoes, CIRR, ...).

What every real adapter does the same way:

* annotation files live under the adapter's `raw_dir`; with a base URL they are fetched there first
  (a file already there is not fetched again), and the sha256 of each one read goes into the report;
* images are hard-linked from where they were downloaded or unpacked into `out_dir/images/...`
  (copied when the file system cannot link: another file system, or none with hard links), so the
  manifest folder costs no extra disk;
* a query is kept only when its reference and target images are both present and in the query's
  split; every dropped query is counted by reason in `out_dir/ingest_report.json`;
* a malformed annotation file is a StageError naming the file and the record.

`Ingest` is the collector of the TIRG adapters (CSS3D, MIT-States, Fashion200k), which list every
dropped query in the report; archives are downloaded and unpacked by stages/datasets/archives.py.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from stages.common.atomic import write_json
from stages.common.errors import StageError
from stages.datasets.download import DownloadConfig, Item, Result, fetch_all, sha256_of
from stages.datasets.manifest import IMAGES_SCHEMA, QUERIES_SCHEMA

REPORT_FILE = "ingest_report.json"
MISSING_LISTED = 50  # missing image ids written to the report per split (plus the total count)
MISSING_SHOWN = 5  # missing names shown in an error or warning message
LISTED = 1000  # entries an `Ingest` report lists per list (the report always has the full count)

# Why a query was dropped; the keys of `dropped` in the report.
NO_TARGET = "no_target"  # the annotation has no target (hidden test labels)
EMPTY_TEXT = "empty_text"  # no non-blank text left
SAME_IMAGE = "reference_equals_target"  # unreachable: evaluation removes the reference from the gallery
OTHER_SPLIT = "image_in_other_split"  # an image of the query is assigned to a different split
MISSING_IMAGE = "missing_image"  # the reference or target file could not be had


# ---------------------------------------------------------------- annotation files


def annotation_files(
    raw_dir: Path,
    relative_paths: list[str],
    base_urls: dict[str, str | None],
    download: DownloadConfig,
    how_to_get: str,
) -> dict[str, Path]:
    """The local path of each annotation file, `raw_dir/<relative path>`.

    `base_urls` maps a folder prefix of the relative paths ("" for all) to a base URL or None; the
    files under a prefix with a URL are fetched from `<url>/<relative path>` unless already there.
    Files without a URL must already be in raw_dir; a missing one is a StageError saying `how_to_get`.
    """
    items = []
    for rel in relative_paths:
        base = _base_url_for(rel, base_urls)
        if base is not None:
            items.append(Item(url=f"{base.rstrip('/')}/{rel}", dest=raw_dir / rel))
    if items:
        failed = [r for r in fetch_all(items, download, desc="annotations") if not r.ok]
        if failed:
            lines = "\n".join(f"  {r.item.url}: {r.status} {r.error}" for r in failed)
            raise StageError(f"could not fetch {len(failed)} annotation file(s) into {raw_dir}:\n{lines}")
    missing = [rel for rel in relative_paths if not (raw_dir / rel).is_file()]
    if missing:
        listed = "\n".join(f"  {raw_dir / rel}" for rel in missing)
        raise StageError(f"{len(missing)} annotation file(s) missing:\n{listed}\n{how_to_get}")
    return {rel: raw_dir / rel for rel in relative_paths}


def _base_url_for(rel: str, base_urls: dict[str, str | None]) -> str | None:
    """The URL of the longest prefix of `rel` in `base_urls`."""
    matches = [prefix for prefix in base_urls if rel.startswith(prefix)]
    return base_urls[max(matches, key=len)] if matches else None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StageError(f"{path}: not valid JSON: {err}") from None


def read_lines(path: Path) -> list[str]:
    """Non-blank lines, stripped of surrounding whitespace (and of the CR of CRLF files)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise StageError(f"{path}: not UTF-8 text: {err}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def record_error(path: Path, record: str, message: str) -> StageError:
    """E.g. 'captions/cap.dress.val.json: record 12: "candidate" must be a string, got None'."""
    return StageError(f"{path}: {record}: {message}")


def expect_list(path: Path, data: Any, what: str) -> list:
    if not isinstance(data, list):
        raise StageError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
    return data


def expect_string(path: Path, record: str, value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise record_error(path, record, f"{key!r} must be a non-empty string, got {value!r}")
    return value


def check_count(path: Path | str, what: str, expected: int, found: int) -> None:
    """With `expect_full` on: the documented size of a full download."""
    if found != expected:
        raise StageError(
            f"{path}: expected {expected:,} {what} (the documented full dataset), found {found:,}; "
            f"set expect_full: false for a partial copy"
        )


# ---------------------------------------------------------------- images


def safe_relative_path(path: str, where: str, what: str = "path") -> PurePosixPath:
    """`path` as a relative POSIX path that stays inside its folder; an empty one, an absolute one or
    one with '..' is a StageError naming `where` (an image path of an annotation, an archive member)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise StageError(f"{where}: {what} {path!r} must be relative and must not contain '..'")
    return pure


def manifest_path(relative: str, where: str) -> str:
    """`images/<relative>` as a clean POSIX path; a name that climbs out ('..', absolute) is a StageError."""
    path = safe_relative_path(relative.replace("\\", "/"), where, "image path")
    return str(PurePosixPath("images", *[part for part in path.parts if part != "."]))


# os.link's failures that mean "no hard link here" rather than a problem with the files: another file
# system (EXDEV), or one without hard links (EPERM, ENOTSUP / EOPNOTSUPP). Any other error is raised.
NO_LINK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})


class ImageLinker:
    """Puts raw image files into the manifest folder by hard link: no copy, no extra disk. Where the
    file system cannot link (NO_LINK_ERRNOS) it copies instead, and says so once."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.copied = 0
        self._made_dirs: set[Path] = set()

    def place(self, source: Path, path: str) -> None:
        """Make `out_dir/path` the file `source` (path as written in images.parquet)."""
        dest = self.out_dir / path
        if dest.parent not in self._made_dirs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(dest.parent)
        if dest.exists():
            dest.unlink()
        try:
            os.link(source, dest)
        except OSError as err:
            if err.errno not in NO_LINK_ERRNOS:
                raise
            if self.copied == 0:
                print(f"note: cannot hard-link {source} into {self.out_dir} ({err}); "
                      f"copying the images instead of hard-linking them", file=sys.stderr)
            shutil.copyfile(source, dest)
            self.copied += 1


def is_usable_file(path: Path) -> bool:
    """Present and not empty (a 0-byte download is a dead link; decoding is checked by `resize`)."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def fetch_remembering_dead(items: list[Item], download: DownloadConfig, dead_file: Path, desc: str) -> list[Result]:
    """`fetch_all`, except that a URL that answered 404/410 before (listed in `dead_file`) is not asked
    again while its file is absent; delete `dead_file` to retry them. Newly dead URLs are added to it."""
    dead: dict[str, str] = read_json(dead_file) if dead_file.exists() else {}

    def known_dead(item: Item) -> bool:
        return item.url in dead and not Path(item.dest).exists()

    to_fetch = [item for item in items if not known_dead(item)]
    fetched = {result.item: result for result in fetch_all(to_fetch, download, desc=desc)} if to_fetch else {}
    for item in filter(known_dead, items):
        fetched[item] = Result(item, "missing", f"{dead[item.url]} (remembered in {dead_file})")
    newly_dead = {r.item.url: r.error for r in fetched.values() if r.status == "missing" and r.item.url not in dead}
    if newly_dead:
        write_json(dead_file, {**dead, **newly_dead})
    return [fetched[item] for item in items]


def missing_images_message(dataset: str, images_dir: Path, missing: list[str], total: int, how_to_get: str) -> str:
    shown = ", ".join(missing[:MISSING_SHOWN]) + (", ..." if len(missing) > MISSING_SHOWN else "")
    return (
        f"{dataset}: {len(missing):,} of {total:,} images are not in {images_dir} (e.g. {shown}).\n{how_to_get}"
    )


def require_images_dir(dataset: str, images_dir: Path, how_to_get: str) -> None:
    if not images_dir.is_dir():
        raise StageError(f"{dataset}: images folder {images_dir} does not exist.\n{how_to_get}")


def report_missing_images(dataset: str, images_dir: Path, missing: list[str], total: int, how_to_get: str) -> None:
    """None found is a StageError (wrong folder); some missing is a warning (their queries are dropped)."""
    if not missing:
        return
    message = missing_images_message(dataset, images_dir, missing, total, how_to_get)
    if len(missing) == total:
        raise StageError(message)
    print(f"warning: {message}\nTheir queries are dropped (see {REPORT_FILE}).", file=sys.stderr)


# ---------------------------------------------------------------- splits and queries


def assign_image_splits(listings: Iterable[tuple[str, str]], priority: tuple[str, ...]) -> dict[str, str]:
    """One split per image from its (image_id, split) listings: the first of `priority` it is listed in.

    Evaluation splits come first in `priority`, so an image listed in train by one category and in val
    by another is a val image, and the train queries that use it are dropped (no val image is trained on).
    """
    best: dict[str, str] = {}
    for image_id, split in listings:
        if image_id not in best or priority.index(split) < priority.index(best[image_id]):
            best[image_id] = split
    return best


@dataclass(frozen=True)
class Candidate:
    """A query as the annotation states it, before the checks that may drop it."""

    query_id: str
    split: str
    reference_id: str
    text: str
    target_id: str | None  # None where the annotation hides it (a test split)


@dataclass
class SplitReport:
    queries_read: int = 0
    queries_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    images: int = 0  # images of the split in images.parquet
    missing_images: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "queries_read": self.queries_read,
            "queries_kept": self.queries_kept,
            "dropped": dict(sorted(self.dropped.items())),
            "images": self.images,
            "missing_images": {"count": len(self.missing_images), "first": self.missing_images[:MISSING_LISTED]},
        }


class IngestReport:
    """What `ingest_report.json` records: per split counts, drops by reason, missing images, and the
    sha256 of every annotation file read (the sources change over time)."""

    def __init__(self, dataset: str, raw_dir: Path):
        self.dataset = dataset
        self.raw_dir = Path(raw_dir)
        self.splits: dict[str, SplitReport] = {}
        self.annotation_sha256: dict[str, str] = {}
        self.extra: dict[str, Any] = {}

    def split(self, name: str) -> SplitReport:
        return self.splits.setdefault(name, SplitReport())

    def annotation(self, path: Path) -> Path:
        """Record the sha256 of an annotation file about to be read; returns the path."""
        try:
            key = path.relative_to(self.raw_dir).as_posix()
        except ValueError:
            key = str(path)
        self.annotation_sha256[key] = sha256_of(path)
        return path

    def as_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "raw_dir": str(self.raw_dir),
            "annotation_sha256": dict(sorted(self.annotation_sha256.items())),
            "splits": {name: report.as_dict() for name, report in sorted(self.splits.items())},
            **self.extra,
        }

    def write(self, out_dir: Path) -> dict:
        report = self.as_dict()
        write_ingest_report(out_dir, report)
        return report


def write_ingest_report(out_dir: Path, report: dict) -> None:
    """`out_dir/ingest_report.json`."""
    write_json(Path(out_dir) / REPORT_FILE, report)


def listed(items: list) -> dict:
    """A list as a report gives it: the full count, and the first LISTED entries."""
    return {"count": len(items), "first": items[:LISTED]}


@dataclass
class Ingest:
    """What a TIRG adapter (CSS3D, MIT-States, Fashion200k) collects before writing: the manifest rows,
    and what it had to leave out, every dropped query with its reason and detail."""

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
        linker = ImageLinker(out_dir)
        for row in tqdm(self.images, desc=f"link {dataset} images", unit="img", disable=None):
            linker.place(self.sources[row["image_id"]], row["path"])
        return linker.copied

    def tables(self) -> tuple[pa.Table, pa.Table]:
        return tables(self.images, self.queries)

    def report(self, dataset: str, raw_dir: Path, annotation_sha256: dict[str, str], splits: tuple[str, ...]) -> dict:
        """The ingest report, in the layout of IngestReport: per split counts of images, missing images,
        queries read and kept, and drops by reason; and every dropped query."""
        return {
            "dataset": dataset,
            "raw_dir": str(raw_dir),
            "annotation_sha256": dict(sorted(annotation_sha256.items())),
            "splits": {split: self._split_report(split) for split in sorted(splits)},
            "dropped_queries": listed(self.dropped),
        }

    def _split_report(self, split: str) -> dict:
        kept = sum(1 for row in self.queries if row["split"] == split)
        reasons = Counter(row["reason"] for row in self.dropped if row["split"] == split)
        missing = self.missing_images.get(split, [])
        return {
            "images": sum(1 for row in self.images if row["split"] == split),
            "missing_images": listed(missing),
            "queries_read": kept + sum(reasons.values()),
            "queries_kept": kept,
            "dropped": dict(sorted(reasons.items())),
        }


def select_queries(
    candidates: Iterable[Candidate], image_split: dict[str, str], present: set[str], report: IngestReport
) -> list[dict]:
    """The manifest rows of the candidates that survive the checks; the others are counted by reason.

    Every image a candidate names must be in `image_split` (the adapter checks its annotations first)."""
    rows = []
    for q in candidates:
        split_report = report.split(q.split)
        split_report.queries_read += 1
        reason = _drop_reason(q, image_split, present)
        if reason is not None:
            split_report.dropped[reason] += 1
            continue
        split_report.queries_kept += 1
        rows.append(
            {"query_id": q.query_id, "split": q.split, "reference_id": q.reference_id, "text": q.text,
             "target_id": q.target_id}
        )
    return rows


def _drop_reason(q: Candidate, image_split: dict[str, str], present: set[str]) -> str | None:
    if q.target_id is None:
        return NO_TARGET
    if not q.text.strip():
        return EMPTY_TEXT
    if q.reference_id == q.target_id:
        return SAME_IMAGE
    if image_split[q.reference_id] != q.split or image_split[q.target_id] != q.split:
        return OTHER_SPLIT
    if q.reference_id not in present or q.target_id not in present:
        return MISSING_IMAGE
    return None


@dataclass(frozen=True)
class ImageRow:
    image_id: str
    path: str  # relative to out_dir, e.g. images/B008BHCT58.jpg
    split: str
    caption: str
    source: Path  # the raw file it is linked from


def place_images(rows: list[ImageRow], present: set[str], out_dir: Path, report: IngestReport) -> list[dict]:
    """Link the present images into out_dir; count them and the missing ones per split in the report."""
    linker = ImageLinker(out_dir)
    kept = []
    for row in rows:
        split_report = report.split(row.split)
        if row.image_id not in present:
            split_report.missing_images.append(row.image_id)
            continue
        linker.place(row.source, row.path)
        split_report.images += 1
        kept.append({"image_id": row.image_id, "path": row.path, "split": row.split, "caption": row.caption})
    report.extra["images_copied_not_linked"] = linker.copied
    return kept


def tables(images: list[dict], queries: list[dict]) -> tuple[pa.Table, pa.Table]:
    return (
        pa.Table.from_pylist(images, schema=IMAGES_SCHEMA),
        pa.Table.from_pylist(queries, schema=QUERIES_SCHEMA),
    )
