import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.datasets import manifest
from stages.datasets.manifest import IMAGES_SCHEMA, QUERIES_SCHEMA
from stages.common.errors import ManifestError


def tables(images=None, queries=None):
    images = images or [
        {"image_id": "a", "path": "images/a.png", "split": "train", "caption": "a red circle"},
        {"image_id": "b", "path": "images/b.png", "split": "train", "caption": "a blue circle"},
        {"image_id": "c", "path": "images/c.png", "split": "test", "caption": "a green circle"},
    ]
    queries = queries or [{"query_id": "q0", "split": "train", "reference_id": "a", "text": "make it blue",
                           "target_id": "b"}]
    return pa.Table.from_pylist(images, schema=IMAGES_SCHEMA), pa.Table.from_pylist(queries, schema=QUERIES_SCHEMA)


def test_round_trip(tmp_path):
    images, queries = tables()
    manifest.write(tmp_path, images, queries)
    read_images, read_queries = manifest.read(tmp_path)
    assert read_images.equals(images) and read_queries.equals(queries)


@pytest.mark.parametrize(
    "images,queries,message",
    [
        ([{"image_id": "a", "path": "x", "split": "train", "caption": ""}] * 2, None, "duplicate image_id 'a'"),
        (None, [{"query_id": "q0", "split": "train", "reference_id": "a", "text": "t", "target_id": "zz"}],
         "query 'q0' names target_id 'zz', which is not in images.parquet"),
        (None, [{"query_id": "q0", "split": "train", "reference_id": "a", "text": "t", "target_id": "c"}],
         "query 'q0' is in split 'train' but its target_id 'c' is in split 'test'"),
    ],
)
def test_broken_contract_names_file_and_record(tmp_path, images, queries, message):
    with pytest.raises(ManifestError, match=message):
        manifest.write(tmp_path, *tables(images, queries))
    assert not (tmp_path / "images.parquet").exists()


def test_unreadable_or_incomplete_manifest_is_named(tmp_path):
    with pytest.raises(ManifestError, match="images.parquet: missing"):
        manifest.read(tmp_path)
    images, queries = tables()
    manifest.write(tmp_path, images, queries)
    (tmp_path / "queries.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="queries.parquet: not a readable Parquet file"):
        manifest.read(tmp_path)
    pq.write_table(queries.drop(["text"]), tmp_path / "queries.parquet")
    with pytest.raises(ManifestError, match=r"queries.parquet: missing columns \['text'\]"):
        manifest.read(tmp_path)
