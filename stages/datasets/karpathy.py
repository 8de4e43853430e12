"""Karpathy's split files (dataset_coco.json, dataset_flickr30k.json) -> images/ and the ITM manifests.

Shared by the `coco` and `flickr30k` adapters; not an adapter itself (it has no entry in ADAPTERS).

The JSON (Karpathy's dataset_coco.json / dataset_flickr30k.json) is `{"images": [record, ...], "dataset": ...}`, one record per image in
Karpathy order (`imgid` = position):

    filename    "COCO_val2014_000000391895.jpg" / "1000092795.jpg"; image_id = filename without extension,
                case kept
    filepath    COCO only: the folder of the file, "train2014" or "val2014"
    split       train | restval | val | test; restval (COCO's 30,504 extra val2014 images) becomes train
                when `restval_as_train` (the ITM papers' 113,287-image train), else stays a split
    sentences   [{"raw": str, "sentid": int, "tokens": [...], "imgid": int}, ...]; caption_id = str(sentid),
                text = raw with runs of whitespace made one space (raws have trailing spaces)

Each image keeps its first `captions_per_image` non-blank sentences (SCAN keeps 5; some COCO images
have 6 or 7); 0 keeps them all. An image with fewer is an error naming it.

The Karpathy zip (caption_datasets.zip) has been offline since ~2023: the JSON is read from
`raw_dir/<json name>`, else extracted from `raw_dir/caption_datasets.zip`, else fetched from
`karpathy_url` (the JSON itself or a zip holding it, e.g. a mirror) when that param is set.
"""
from __future__ import annotations

import shutil
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

import pyarrow as pa
from tqdm import tqdm

from stages.datasets import captions
from stages.common.atomic import atomic_path, write_json
from stages.common.errors import StageError
from stages.datasets.common import ImageLinker, is_usable_file, read_json
from stages.datasets.download import DownloadConfig, Item, Result, fetch_all, sha256_of
from stages.datasets.manifest import IMAGES_SCHEMA, QUERIES_SCHEMA

KARPATHY_SPLITS = ("train", "restval", "val", "test")
KARPATHY_ARCHIVE = "caption_datasets.zip"
REPORT_FILE = "ingest_report.json"  # the name stages.datasets.common gives it for every real dataset
MISSING_EXAMPLES = 5

OnMissing = Literal["error", "drop"]


class KarpathyOptions(Protocol):
    """The params every Karpathy adapter's Config has (see coco.Config, flickr30k.Config)."""

    raw_dir: str
    karpathy_url: str | None
    images_dir: str
    restval_as_train: bool
    captions_per_image: int
    on_missing: OnMissing
    expect_full: bool


@dataclass(frozen=True)
class Dataset:
    """What differs between the Karpathy datasets."""

    name: str  # "coco"
    json_name: str  # "dataset_coco.json"
    has_folders: bool  # records carry `filepath`, the sub-folder of the image file
    expected_counts: dict[str, int]  # images per Karpathy split in the full file
    mirror_sha256: str  # of the JSON in the Delphboy/karpathy-splits Git-LFS mirror
    images_help: str  # how to get the images, said when some are missing


@dataclass(frozen=True)
class Sentence:
    caption_id: str
    text: str


@dataclass(frozen=True)
class Record:
    """One image of the JSON."""

    index: int  # position in `images` (Karpathy order)
    image_id: str
    source: str  # path of the file under images_dir, e.g. "val2014/COCO_val2014_000000391895.jpg"
    split: str  # as the JSON says (restval not mapped yet)
    sentences: tuple[Sentence, ...]  # non-blank, JSON order
    blank_sentences: int


@dataclass(frozen=True)
class Annotation:
    path: Path
    sha256: str
    records: list[Record]


@dataclass(frozen=True)
class Ingested:
    images: pa.Table
    captions: pa.Table
    missing: list[Record]  # image files not found (dropped when on_missing = drop)
    dropped_sentences: int  # beyond captions_per_image
    copied: int  # files copied because they could not be hard-linked (another filesystem)


# ---------------------------------------------------------------- downloads


def fetch_or_fail(items: list[Item], download: DownloadConfig, desc: str) -> list[Result]:
    """fetch_all, but any item that is not downloaded or cached is a StageError naming its URL."""
    results = fetch_all(items, download, desc=desc)
    problems = [f"{r.item.url}: {r.status} ({r.error})" for r in results if not r.ok]
    if problems:
        raise StageError(f"{desc}: {len(problems)} of {len(items)} downloads failed: " + "; ".join(problems))
    return results


# ---------------------------------------------------------------- the annotation file


def _extract_member(archive: Path, member_name: str, target: Path) -> Path:
    """Copy the member of `archive` whose base name is `member_name` to `target` (atomically)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [n for n in zf.namelist() if PurePosixPath(n).name == member_name]
            if not members:
                raise StageError(f"{archive}: holds no {member_name}")
            with zf.open(members[0]) as src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as err:
        raise StageError(f"{archive}: not a readable zip ({err}); delete it and run again") from None
    return target


def annotation_path(dataset: Dataset, cfg: KarpathyOptions, download: DownloadConfig) -> Path:
    """Where the Karpathy JSON is, fetching or unzipping it first when needed (see the module doc)."""
    raw_dir = Path(cfg.raw_dir)
    target = raw_dir / dataset.json_name
    if cfg.karpathy_url is not None:
        dest = raw_dir / (PurePosixPath(urlparse(cfg.karpathy_url).path).name or dataset.json_name)
        fetch_or_fail([Item(cfg.karpathy_url, dest)], download, f"{dataset.name} karpathy split")
        if dest == target or not zipfile.is_zipfile(dest):
            return dest
        return target if target.exists() else _extract_member(dest, dataset.json_name, target)
    if target.exists():
        return target
    archive = raw_dir / KARPATHY_ARCHIVE
    if archive.exists():
        return _extract_member(archive, dataset.json_name, target)
    raise StageError(
        f"{target}: missing. Put Karpathy's {dataset.json_name} there (or {KARPATHY_ARCHIVE}, which holds it; "
        f"the original http://cs.stanford.edu/people/karpathy/deepimagesent/{KARPATHY_ARCHIVE} is offline, "
        f"mirrors exist), or set dataset.{dataset.name}.karpathy_url"
    )


def _field(raw: dict, key: str, kind: type, where: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        got = "missing" if key not in raw else f"{type(value).__name__} {value!r}"[:80]
        raise StageError(f"{where}: field '{key}' should be a {kind.__name__}, got {got}")
    return value


def _plain_name(name: str, key: str, where: str) -> str:
    """A single path component: no folder separators, not '.' or '..' (paths must stay under images/)."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise StageError(f"{where}: field '{key}' {name!r} is not a plain file or folder name")
    return name


def _sentences(raw: list, where: str) -> tuple[tuple[Sentence, ...], int]:
    kept, blank = [], 0
    for j, sentence in enumerate(raw):
        at = f"{where}.sentences[{j}]"
        if not isinstance(sentence, dict):
            raise StageError(f"{at}: expected an object, got {type(sentence).__name__}")
        text = " ".join(_field(sentence, "raw", str, at).split())
        sentid = _field(sentence, "sentid", int, at)
        if text:
            kept.append(Sentence(str(sentid), text))
        else:
            blank += 1
    return tuple(kept), blank


def parse_record(raw: Any, index: int, path: Path, has_folders: bool) -> Record:
    where = f"{path}: images[{index}]"
    if not isinstance(raw, dict):
        raise StageError(f"{where}: expected an object, got {type(raw).__name__}")
    filename = _plain_name(_field(raw, "filename", str, where), "filename", where)
    split = _field(raw, "split", str, where)
    if split not in KARPATHY_SPLITS:
        raise StageError(f"{where}: field 'split' is {split!r}, expected one of {list(KARPATHY_SPLITS)}")
    source = filename
    if has_folders:
        source = f"{_plain_name(_field(raw, 'filepath', str, where), 'filepath', where)}/{filename}"
    sentences, blank = _sentences(_field(raw, "sentences", list, where), where)
    return Record(index, PurePosixPath(filename).stem, source, split, sentences, blank)


def _first_duplicate(values: Iterable[str]) -> str | None:
    counts = Counter(values)
    return next((value for value, n in counts.items() if n > 1), None)


def parse_records(data: Any, path: Path, has_folders: bool) -> list[Record]:
    """Every record of a loaded Karpathy JSON; a malformed one is a StageError naming file and record."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise StageError(f"{path}: expected an object with an 'images' list (the Karpathy split format)")
    records = [parse_record(raw, i, path, has_folders) for i, raw in enumerate(data["images"])]
    if (duplicate := _first_duplicate(r.image_id for r in records)) is not None:
        raise StageError(f"{path}: two images have the image_id {duplicate!r} (filename without extension)")
    if (duplicate := _first_duplicate(s.caption_id for r in records for s in r.sentences)) is not None:
        raise StageError(f"{path}: two sentences have the sentid {duplicate}")
    return records


def split_counts(records: list[Record]) -> dict[str, int]:
    counts = Counter(r.split for r in records)
    return {split: counts[split] for split in KARPATHY_SPLITS if counts[split]}


def check_full(dataset: Dataset, records: list[Record], path: Path) -> None:
    """expect_full: the file must hold exactly the published number of images per split."""
    found = split_counts(records)
    if found != dataset.expected_counts:
        expected_total = sum(dataset.expected_counts.values())
        raise StageError(
            f"{path}: expected the full {dataset.name} Karpathy split, {expected_total} images "
            f"{dataset.expected_counts}, found {len(records)} {found}; set expect_full: false to ingest a subset"
        )


def load(dataset: Dataset, cfg: KarpathyOptions, download: DownloadConfig) -> Annotation:
    path = annotation_path(dataset, cfg, download)
    records = parse_records(read_json(path), path, dataset.has_folders)
    if cfg.expect_full:
        check_full(dataset, records, path)
    return Annotation(path, sha256_of(path), records)


# ---------------------------------------------------------------- images


def manifest_split(karpathy_split: str, restval_as_train: bool) -> str:
    return "train" if karpathy_split == "restval" and restval_as_train else karpathy_split


def image_path(record: Record) -> str:
    """The manifest path, relative to the output folder."""
    return f"images/{record.source}"


def missing_images(records: list[Record], images_dir: Path) -> list[Record]:
    """Records whose file is absent or empty under `images_dir`."""
    return [r for r in records if not is_usable_file(images_dir / r.source)]


def missing_error(dataset: Dataset, missing: list[Record], total: int, images_dir: Path) -> StageError:
    if not images_dir.is_dir():
        return StageError(f"{images_dir}: images_dir not found; {dataset.images_help}")
    per_split = Counter(r.split for r in missing)
    examples = ", ".join(str(images_dir / r.source) for r in missing[:MISSING_EXAMPLES])
    return StageError(
        f"{dataset.name}: {len(missing)} of {total} images are missing under {images_dir} "
        f"({', '.join(f'{s} {n}' for s, n in sorted(per_split.items()))}), e.g. {examples}. "
        f"{dataset.images_help}; or set on_missing: drop to leave them out (listed in {REPORT_FILE})"
    )


def _kept_sentences(record: Record, per_image: int, path: Path) -> tuple[Sentence, ...]:
    wanted = per_image or 1
    if len(record.sentences) < wanted:
        raise StageError(
            f"{path}: images[{record.index}] ({record.source}) has {len(record.sentences)} non-blank "
            f"sentences, fewer than captions_per_image = {wanted}"
        )
    return record.sentences[:per_image] if per_image else record.sentences


def ingest(
    dataset: Dataset, annotation: Annotation, cfg: KarpathyOptions, out_dir: Path
) -> Ingested:
    """Link every image into `out_dir/images/` and build the images and captions tables."""
    records, images_dir = annotation.records, Path(cfg.images_dir)
    kept_sentences = {r.index: _kept_sentences(r, cfg.captions_per_image, annotation.path) for r in records}
    missing = missing_images(records, images_dir)
    if missing and cfg.on_missing == "error":
        raise missing_error(dataset, missing, len(records), images_dir)
    missing_ids = {r.image_id for r in missing}
    present = [r for r in records if r.image_id not in missing_ids]
    linker = ImageLinker(out_dir)  # hard links; copies (said once) where the filesystem refuses them
    for record in tqdm(present, desc=f"link {dataset.name} images", unit="img", disable=None):
        linker.place(images_dir / record.source, image_path(record))
    image_rows, caption_rows = [], []
    for record in present:
        split = manifest_split(record.split, cfg.restval_as_train)
        sentences = kept_sentences[record.index]
        image_rows.append(
            {"image_id": record.image_id, "path": image_path(record), "split": split, "caption": sentences[0].text}
        )
        caption_rows += [
            {"caption_id": s.caption_id, "image_id": record.image_id, "split": split, "text": s.text}
            for s in sentences
        ]
    dropped = sum(len(r.sentences) - len(kept_sentences[r.index]) for r in records)
    return Ingested(
        images=pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA),
        captions=captions.table(caption_rows),
        missing=missing,
        dropped_sentences=dropped,
        copied=linker.copied,
    )


def empty_queries() -> pa.Table:
    """ITM datasets have no composed queries: a valid queries table with no rows."""
    return pa.Table.from_pylist([], schema=QUERIES_SCHEMA)


# ---------------------------------------------------------------- outputs


def _per_split(table: pa.Table) -> dict[str, int]:
    counts = Counter(table.column("split").to_pylist())
    return dict(sorted(counts.items()))


def _under(path: Path, folder: Path) -> str:
    """`path` relative to `folder` when inside it (as common.IngestReport keys annotation files)."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def report(dataset: Dataset, annotation: Annotation, ingested: Ingested, cfg: KarpathyOptions) -> dict:
    """What ingest_report.json records (the adapter may add keys)."""
    return {
        "dataset": dataset.name,
        "raw_dir": cfg.raw_dir,
        "annotation_sha256": {_under(annotation.path, Path(cfg.raw_dir)): annotation.sha256},
        "annotation_matches_mirror": annotation.sha256 == dataset.mirror_sha256,
        "karpathy_splits": split_counts(annotation.records),
        "restval_as_train": cfg.restval_as_train,
        "images": _per_split(ingested.images),
        "captions": _per_split(ingested.captions),
        "blank_sentences_skipped": sum(r.blank_sentences for r in annotation.records),
        "sentences_beyond_captions_per_image": ingested.dropped_sentences,
        "missing_images": [
            {"image_id": r.image_id, "file": r.source, "split": manifest_split(r.split, cfg.restval_as_train)}
            for r in ingested.missing
        ],
        "images_copied_not_linked": ingested.copied,
    }


def write_outputs(out_dir: Path, ingested: Ingested, report_data: dict) -> None:
    """captions.parquet (validated against the images table) and ingest_report.json."""
    captions.write(out_dir, ingested.captions, ingested.images)
    write_json(out_dir / REPORT_FILE, report_data)
