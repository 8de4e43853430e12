"""The two Parquet manifests every dataset adapter writes and every later stage reads.

images.parquet   image_id, path (relative to the manifest's folder), split, caption
queries.parquet  query_id, split, reference_id, text, target_id

No stage after `prepare` knows which dataset it reads: it sees only these two tables.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.common.atomic import atomic_path
from stages.common.errors import ManifestError

IMAGES_FILE = "images.parquet"
QUERIES_FILE = "queries.parquet"

IMAGES_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("path", pa.string()), ("split", pa.string()), ("caption", pa.string())]
)
QUERIES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("split", pa.string()),
        ("reference_id", pa.string()),
        ("text", pa.string()),
        ("target_id", pa.string()),
    ]
)


def _duplicates(values: list[str]) -> list[str]:
    return [v for v, n in Counter(values).items() if n > 1]


def validate(images: pa.Table, queries: pa.Table, where: Path | str = "<memory>") -> None:
    """Check the contract between the two tables; raise ManifestError naming the first bad record."""
    where = Path(where)
    for table, schema, name in ((images, IMAGES_SCHEMA, IMAGES_FILE), (queries, QUERIES_SCHEMA, QUERIES_FILE)):
        if not table.schema.equals(schema, check_metadata=False):
            raise ManifestError(f"{where / name}: schema {table.schema} differs from the expected {schema}")
        for column in schema.names:
            if table.column(column).null_count:
                raise ManifestError(f"{where / name}: column '{column}' has null values")
    image_ids = images.column("image_id").to_pylist()
    if dup := _duplicates(image_ids):
        raise ManifestError(f"{where / IMAGES_FILE}: duplicate image_id {dup[0]!r}")
    if dup := _duplicates(queries.column("query_id").to_pylist()):
        raise ManifestError(f"{where / QUERIES_FILE}: duplicate query_id {dup[0]!r}")
    split_of = dict(zip(image_ids, images.column("split").to_pylist()))
    for q in queries.to_pylist():
        for role in ("reference_id", "target_id"):
            if q[role] not in split_of:
                raise ManifestError(
                    f"{where / QUERIES_FILE}: query {q['query_id']!r} names {role} {q[role]!r}, "
                    f"which is not in {IMAGES_FILE}"
                )
            if split_of[q[role]] != q["split"]:
                raise ManifestError(
                    f"{where / QUERIES_FILE}: query {q['query_id']!r} is in split {q['split']!r} but its "
                    f"{role} {q[role]!r} is in split {split_of[q[role]]!r}"
                )


def write(out_dir: Path | str, images: pa.Table, queries: pa.Table) -> None:
    """Validate, then write both manifests atomically into `out_dir`."""
    out_dir = Path(out_dir)
    images, queries = images.cast(IMAGES_SCHEMA), queries.cast(QUERIES_SCHEMA)
    validate(images, queries, out_dir)
    for table, name in ((images, IMAGES_FILE), (queries, QUERIES_FILE)):
        with atomic_path(out_dir / name) as tmp:
            pq.write_table(table, tmp)


def read_table(path: Path, schema: pa.Schema, missing_hint: str = "did the previous stage run?") -> pa.Table:
    """One manifest file with exactly `schema`'s columns; ManifestError naming the file otherwise."""
    if not path.exists():
        raise ManifestError(f"{path}: missing ({missing_hint})")
    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as err:
        raise ManifestError(f"{path}: not a readable Parquet file: {err}") from None
    missing = set(schema.names) - set(table.schema.names)
    if missing:
        raise ManifestError(f"{path}: missing columns {sorted(missing)}")
    return table.select(schema.names).cast(schema)


def read(manifest_dir: Path | str) -> tuple[pa.Table, pa.Table]:
    """Read and validate (images, queries) from `manifest_dir`."""
    manifest_dir = Path(manifest_dir)
    images = read_table(manifest_dir / IMAGES_FILE, IMAGES_SCHEMA)
    queries = read_table(manifest_dir / QUERIES_FILE, QUERIES_SCHEMA)
    validate(images, queries, manifest_dir)
    return images, queries
