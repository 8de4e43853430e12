"""SCAN's pre-computed bottom-up region features (`coco_precomp`, `f30k_precomp`; kuanghuei/SCAN).

A reader, NOT a `prepare` adapter (it has no Config/build and must not go into ADAPTERS): its
"images" are rows of a float32 array (N, 36, 2048) of Faster R-CNN region features, not files, so
resize and shard, which open every images.parquet path as a picture, cannot use them. Only
region-based ITM models (SCAN, BFAN, VSRN, ...) read them; `ingest` gives those models the same
captions.parquet as the image datasets plus a table of feature rows, and `read` loads them back.

Files per SCAN split (train, dev, test, testall; COCO 1K/5K use testall, Flickr30K uses test):
    <split>_caps.txt   one caption per line (UTF-8), 5 consecutive lines per image, Karpathy order
    <split>_ims.npy    optional: the features, one row per image, or one per caption (rows repeated
                       5 times, as in f30k dev); only its shape is read (memory-mapped)
    <split>_ids.txt    optional: one integer per feature row. COCO: the COCO image id; Flickr30k: the
                       Karpathy imgid, which `read_id_mapping` (vse_infty's id_mapping.json) maps to a
                       file name

Checks: lines(ids) == rows(ims); lines(caps) is rows or 5 x rows; the rows of one image carry one id.
Caption i belongs to image i // 5, whose feature row is (i // 5) x rows_per_image.

image_id: the file name without extension when `names` maps the ids (so f30k ids meet the flickr30k
adapter's image_ids), else the id itself, else "<scan split>-<image index>" when there is no ids file.
caption_id: "<scan split>-<line index>" (0-based). A blank caption line is skipped but keeps its index.

Outputs of `ingest` (into a folder of its own, e.g. data/precomp/f30k):
    regions.parquet   image_id, split, row: each image's first feature row
    captions.parquet  stages.datasets.captions, validated against regions.parquet
    features.json     per manifest split: the SCAN split, the .npy path and shape, rows_per_image,
                      counts, sha256 of the caption and ids files
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.datasets import captions
from stages.common.atomic import atomic_path, write_json
from stages.common.errors import StageError
from stages.datasets.download import sha256_of
from stages.common.errors import ManifestError

SCAN_SPLITS = ("train", "dev", "test", "testall")
CAPTIONS_PER_IMAGE = 5
# SCAN split -> manifest split, for the ITM protocol of each dataset (test is the first 1K of testall).
COCO_SPLITS = {"train": "train", "dev": "val", "testall": "test"}
F30K_SPLITS = {"train": "train", "dev": "val", "test": "test"}

REGIONS_FILE = "regions.parquet"
FEATURES_FILE = "features.json"
REGIONS_SCHEMA = pa.schema([("image_id", pa.string()), ("split", pa.string()), ("row", pa.int64())])


@dataclass(frozen=True)
class PrecompSplit:
    name: str  # the SCAN split
    captions_file: Path
    captions: list[str]  # one per line, blank ones kept as ""
    ids_file: Path | None
    ids: list[int] | None  # one per feature row
    features: Path | None
    feature_shape: tuple[int, ...] | None
    rows: int  # feature rows; lines(caps) / 5 when neither features nor ids are there
    rows_per_image: int  # 1, or 5 when each image's row is repeated once per caption

    @property
    def images(self) -> int:
        return len(self.captions) // CAPTIONS_PER_IMAGE


# ---------------------------------------------------------------- reading one split


def read_lines(path: Path) -> list[str]:
    """The file's lines (without LF or CR); a last line without LF counts, a final LF adds none."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise StageError(f"{path}: not UTF-8: {err}") from None
    lines = text.split("\n")  # not splitlines(): it would also split captions on \x1c, \u2028, ...
    if lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_ids(path: Path) -> list[int]:
    ids = []
    for number, line in enumerate(read_lines(path), start=1):
        try:
            ids.append(int(line))
        except ValueError:
            raise StageError(f"{path}:{number}: expected an integer id, got {line!r}") from None
    return ids


def read_feature_shape(path: Path) -> tuple[int, ...]:
    """The shape of a .npy array, memory-mapped so a 33 GB file costs nothing."""
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except (ValueError, OSError) as err:
        raise StageError(f"{path}: not a readable .npy array: {err}") from None


def _row_count(caption_lines: int, shape: tuple[int, ...] | None, ids: list[int] | None,
               ims_file: Path, ids_file: Path) -> int:
    if shape is not None and ids is not None and shape[0] != len(ids):
        raise StageError(f"{ids_file}: {len(ids)} ids but {ims_file} has {shape[0]} rows; they must be equal")
    if shape is not None:
        return shape[0]
    if ids is not None:
        return len(ids)
    return caption_lines // CAPTIONS_PER_IMAGE


def read_split(precomp_dir: Path | str, name: str) -> PrecompSplit:
    """One SCAN split, checked (see the module doc); the captions file must exist, the others may not."""
    if name not in SCAN_SPLITS:
        raise StageError(f"scan precomp: unknown split {name!r}, expected one of {list(SCAN_SPLITS)}")
    precomp_dir = Path(precomp_dir)
    caps_file, ims_file, ids_file = (precomp_dir / f"{name}_{kind}" for kind in ("caps.txt", "ims.npy", "ids.txt"))
    if not caps_file.exists():
        raise StageError(f"{caps_file}: missing (SCAN precomp captions of split {name!r})")
    lines = read_lines(caps_file)
    if not lines or len(lines) % CAPTIONS_PER_IMAGE:
        raise StageError(f"{caps_file}: {len(lines)} lines, expected a positive multiple of {CAPTIONS_PER_IMAGE}")
    shape = read_feature_shape(ims_file) if ims_file.exists() else None
    ids = read_ids(ids_file) if ids_file.exists() else None
    rows = _row_count(len(lines), shape, ids, ims_file, ids_file)
    if len(lines) not in (rows, CAPTIONS_PER_IMAGE * rows):
        raise StageError(
            f"{caps_file}: {len(lines)} captions for {rows} feature rows; expected {rows} (rows repeated per "
            f"caption) or {CAPTIONS_PER_IMAGE * rows} ({CAPTIONS_PER_IMAGE} captions per row)"
        )
    return PrecompSplit(
        name=name,
        captions_file=caps_file,
        captions=lines,
        ids_file=ids_file if ids is not None else None,
        ids=ids,
        features=ims_file if shape is not None else None,
        feature_shape=shape,
        rows=rows,
        rows_per_image=CAPTIONS_PER_IMAGE * rows // len(lines),
    )


def read_id_mapping(path: Path | str) -> dict[int, str]:
    """vse_infty's f30k id_mapping.json, {"0": "1000092795.jpg", ...} -> {0: "1000092795.jpg", ...}."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {int(key): str(name) for key, name in raw.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ValueError) as err:
        raise StageError(f"{path}: not an id mapping {{\"<index>\": \"<file name>\"}}: {err}") from None


# ---------------------------------------------------------------- images and captions


def image_ids(split: PrecompSplit, names: dict[int, str] | None = None) -> list[str]:
    """The image_id of each image of `split`, in order (see the module doc)."""
    if split.ids is None:
        return [f"{split.name}-{k:06d}" for k in range(split.images)]
    result = []
    for k in range(split.images):
        first = k * split.rows_per_image
        group = split.ids[first : first + split.rows_per_image]
        if len(set(group)) != 1:
            raise StageError(
                f"{split.ids_file}:{first + 1}: rows {first}..{first + split.rows_per_image - 1} repeat image "
                f"{k} once per caption, so they must carry one id, got {group}"
            )
        image = group[0]
        if names is None:
            result.append(str(image))
        elif image in names:
            result.append(PurePosixPath(names[image]).stem)
        else:
            raise StageError(f"{split.ids_file}:{first + 1}: id {image} is not in the id mapping")
    return result


def tables(
    splits: dict[str, PrecompSplit], manifest_split: dict[str, str], names: dict[int, str] | None = None
) -> tuple[pa.Table, pa.Table]:
    """(regions, captions) of the SCAN splits, each under its manifest split."""
    region_rows, caption_rows = [], []
    for name, split in splits.items():
        ids = image_ids(split, names)
        target = manifest_split[name]
        region_rows += [
            {"image_id": image_id, "split": target, "row": k * split.rows_per_image} for k, image_id in enumerate(ids)
        ]
        caption_rows += [
            {"caption_id": f"{name}-{i:06d}", "image_id": ids[i // CAPTIONS_PER_IMAGE], "split": target, "text": text}
            for i, text in enumerate(split.captions)
            if text.strip()
        ]
    return pa.Table.from_pylist(region_rows, schema=REGIONS_SCHEMA), captions.table(caption_rows)


def feature_summary(split: PrecompSplit) -> dict:
    return {
        "scan_split": split.name,
        "features": str(split.features) if split.features else None,
        "shape": list(split.feature_shape) if split.feature_shape else None,
        "rows_per_image": split.rows_per_image,
        "images": split.images,
        "captions": len(split.captions),
        "blank_captions": sum(1 for text in split.captions if not text.strip()),
        "captions_sha256": sha256_of(split.captions_file),
        "ids_sha256": sha256_of(split.ids_file) if split.ids_file else None,
    }


# ---------------------------------------------------------------- the outputs


def _check_regions(regions: pa.Table, file: Path) -> None:
    if not regions.schema.equals(REGIONS_SCHEMA, check_metadata=False):
        raise ManifestError(f"{file}: schema {regions.schema} differs from the expected {REGIONS_SCHEMA}")
    counts = Counter(regions.column("image_id").to_pylist())
    duplicate = next((image_id for image_id, n in counts.items() if n > 1), None)
    if duplicate is not None:
        raise ManifestError(f"{file}: duplicate image_id {duplicate!r} (an image in two SCAN splits?)")


def ingest(
    precomp_dir: Path | str,
    out_dir: Path | str,
    manifest_split: dict[str, str],
    names: dict[int, str] | None = None,
) -> dict:
    """Read the SCAN splits named by `manifest_split` ({scan split: manifest split}, e.g. COCO_SPLITS)
    and write regions.parquet, captions.parquet and features.json into `out_dir`; returns features.json."""
    targets = list(manifest_split.values())
    if len(set(targets)) != len(targets):
        raise StageError(f"scan precomp: two SCAN splits map to one manifest split: {manifest_split}")
    out_dir = Path(out_dir)
    splits = {name: read_split(precomp_dir, name) for name in manifest_split}
    regions, caption_table = tables(splits, manifest_split, names)
    _check_regions(regions, out_dir / REGIONS_FILE)
    with atomic_path(out_dir / REGIONS_FILE) as tmp:
        pq.write_table(regions, tmp)
    captions.write(out_dir, caption_table, regions, images_name=REGIONS_FILE)
    features = {manifest_split[name]: feature_summary(split) for name, split in splits.items()}
    write_json(out_dir / FEATURES_FILE, features)
    return features


def read(out_dir: Path | str) -> tuple[pa.Table, pa.Table, dict]:
    """(regions, captions, features.json) of an `ingest` output folder, validated."""
    out_dir = Path(out_dir)
    regions_file, features_file = out_dir / REGIONS_FILE, out_dir / FEATURES_FILE
    for file in (regions_file, features_file):
        if not file.exists():
            raise ManifestError(f"{file}: missing (run scan_precomp.ingest first)")
    regions = pq.read_table(regions_file)
    missing = set(REGIONS_SCHEMA.names) - set(regions.schema.names)
    if missing:
        raise ManifestError(f"{regions_file}: missing columns {sorted(missing)}")
    regions = regions.select(REGIONS_SCHEMA.names).cast(REGIONS_SCHEMA)
    _check_regions(regions, regions_file)
    caption_table = captions.read(out_dir, regions, images_name=REGIONS_FILE)
    return regions, caption_table, json.loads(features_file.read_text())
