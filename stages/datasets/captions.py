"""The optional third manifest of image-text matching (ITM) datasets: every caption of every image.

    captions.parquet   caption_id, image_id, split, text

COCO and Flickr30k give each image five captions; images.parquet keeps only the first (its `caption`
column) and queries.parquet is empty for them, so the full caption set lives here. Contract:
caption ids are unique, no value is null, no text is blank, and every caption's image_id is in the
images table of the same split (images.parquet of the same folder, or whatever table with image_id
and split columns the caller names, e.g. the feature rows of SCAN precomp).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.datasets import manifest
from stages.common.atomic import atomic_path
from stages.datasets.manifest import IMAGES_FILE
from stages.common.errors import ManifestError

CAPTIONS_FILE = "captions.parquet"
FOLDS_FILE = "folds.json"  # COCO 1K x 5: {fold: [image_id, ...]}, written by the coco adapter

CAPTIONS_SCHEMA = pa.schema(
    [("caption_id", pa.string()), ("image_id", pa.string()), ("split", pa.string()), ("text", pa.string())]
)


def table(rows: list[dict]) -> pa.Table:
    """A captions table from dicts with the four CAPTIONS_SCHEMA keys."""
    return pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA)


def _check_columns(captions: pa.Table, file: Path) -> None:
    if not captions.schema.equals(CAPTIONS_SCHEMA, check_metadata=False):
        raise ManifestError(f"{file}: schema {captions.schema} differs from the expected {CAPTIONS_SCHEMA}")
    for column in CAPTIONS_SCHEMA.names:
        if captions.column(column).null_count:
            raise ManifestError(f"{file}: column '{column}' has null values")


def validate(
    captions: pa.Table, images: pa.Table, where: Path | str = "<memory>", images_name: str = IMAGES_FILE
) -> None:
    """Check the captions contract against `images` (any table with image_id and split columns);
    raise ManifestError naming the file and the first bad caption."""
    file = Path(where) / CAPTIONS_FILE
    _check_columns(captions, file)
    caption_ids = captions.column("caption_id").to_pylist()
    duplicates = [caption_id for caption_id, n in Counter(caption_ids).items() if n > 1]
    if duplicates:
        raise ManifestError(f"{file}: duplicate caption_id {duplicates[0]!r}")
    split_of = dict(zip(images.column("image_id").to_pylist(), images.column("split").to_pylist()))
    for row in captions.to_pylist():
        if not row["text"].strip():
            raise ManifestError(f"{file}: caption {row['caption_id']!r} has a blank text")
        image_split = split_of.get(row["image_id"])
        if image_split is None:
            raise ManifestError(
                f"{file}: caption {row['caption_id']!r} names image_id {row['image_id']!r}, "
                f"which is not in {images_name}"
            )
        if image_split != row["split"]:
            raise ManifestError(
                f"{file}: caption {row['caption_id']!r} is in split {row['split']!r} but its image "
                f"{row['image_id']!r} is in split {image_split!r}"
            )


def write(out_dir: Path | str, captions: pa.Table, images: pa.Table, images_name: str = IMAGES_FILE) -> None:
    """Validate `captions` against `images`, then write `out_dir/captions.parquet` atomically."""
    out_dir = Path(out_dir)
    captions = captions.cast(CAPTIONS_SCHEMA)
    validate(captions, images, out_dir, images_name)
    with atomic_path(out_dir / CAPTIONS_FILE) as tmp:
        pq.write_table(captions, tmp)


def read(manifest_dir: Path | str, images: pa.Table | None = None, images_name: str = IMAGES_FILE) -> pa.Table:
    """Read and validate `manifest_dir/captions.parquet`, against `images` or, when None, against
    the images.parquet of the same folder."""
    manifest_dir = Path(manifest_dir)
    captions = manifest.read_table(manifest_dir / CAPTIONS_FILE, CAPTIONS_SCHEMA,
                                   "only image-text matching datasets write it")
    if images is None:
        images, _ = manifest.read(manifest_dir)
    validate(captions, images, manifest_dir, images_name)
    return captions


def _grouped(captions: pa.Table) -> dict[str, list[dict[str, str]]]:
    grouped: dict[str, list[dict[str, str]]] = {}
    for row in captions.select(["caption_id", "image_id", "text"]).to_pylist():
        grouped.setdefault(row["image_id"], []).append({"caption_id": row["caption_id"], "text": row["text"]})
    return grouped


def by_image(captions: pa.Table) -> dict[str, list[str]]:
    """image_id -> its caption texts, in table order (the ITM protocol's "5 GT captions")."""
    return {image_id: [c["text"] for c in rows] for image_id, rows in _grouped(captions).items()}


def of_images(captions: pa.Table, images: pa.Table, where: Path | str = "<memory>") -> dict[str, list[dict[str, str]]]:
    """image_id -> [{"caption_id", "text"}, ...] in table order, for every image of `images` (a table
    with image_id and split columns); an image without a caption of its own is a ManifestError
    naming the file and the image."""
    grouped = _grouped(captions)
    for image_id, split in zip(images.column("image_id").to_pylist(), images.column("split").to_pylist()):
        if image_id not in grouped:
            raise ManifestError(
                f"{Path(where) / CAPTIONS_FILE}: image {image_id!r} (split {split!r}) has no caption; "
                "every image of a dataset with captions.parquet needs at least one"
            )
    return grouped
