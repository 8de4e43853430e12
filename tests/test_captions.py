"""captions.parquet: round trip, and every broken contract is a ManifestError naming file and caption."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.datasets import captions, manifest
from stages.datasets.captions import CAPTIONS_FILE, CAPTIONS_SCHEMA
from stages.datasets.manifest import IMAGES_SCHEMA, QUERIES_SCHEMA
from stages.common.errors import ManifestError

IMAGES = [
    {"image_id": "a", "path": "images/a.jpg", "split": "train", "caption": "a dog"},
    {"image_id": "b", "path": "images/b.jpg", "split": "test", "caption": "a cat"},
]
CAPTIONS = [
    {"caption_id": "1", "image_id": "a", "split": "train", "text": "a dog"},
    {"caption_id": "2", "image_id": "a", "split": "train", "text": "a dog on grass"},
    {"caption_id": "3", "image_id": "b", "split": "test", "text": "a cat"},
]


@pytest.fixture
def images(tmp_path) -> pa.Table:
    table = pa.Table.from_pylist(IMAGES, schema=IMAGES_SCHEMA)
    manifest.write(tmp_path, table, pa.Table.from_pylist([], schema=QUERIES_SCHEMA))
    return table


def test_round_trip_against_images_parquet_of_the_same_folder(tmp_path, images):
    captions.write(tmp_path, captions.table(CAPTIONS), images)
    read = captions.read(tmp_path)
    assert read.schema.equals(CAPTIONS_SCHEMA) and read.to_pylist() == CAPTIONS
    assert captions.by_image(read) == {"a": ["a dog", "a dog on grass"], "b": ["a cat"]}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"caption_id": "1"}, "captions.parquet: duplicate caption_id '1'"),
        ({"image_id": "zz"}, "captions.parquet: caption '9' names image_id 'zz', which is not in images.parquet"),
        ({"split": "test"}, "captions.parquet: caption '9' is in split 'test' but its image 'a' is in split 'train'"),
        ({"text": "  "}, "captions.parquet: caption '9' has a blank text"),
    ],
)
def test_broken_contract_names_file_and_caption(tmp_path, images, change, message):
    bad = CAPTIONS + [{"caption_id": "9", "image_id": "a", "split": "train", "text": "x", **change}]
    with pytest.raises(ManifestError, match=f"{tmp_path}/{message}"):
        captions.write(tmp_path, captions.table(bad), images)
    assert not (tmp_path / CAPTIONS_FILE).exists()


def test_nulls_and_wrong_schema_are_errors(tmp_path, images):
    with_null = CAPTIONS + [{"caption_id": None, "image_id": "a", "split": "train", "text": "x"}]
    with pytest.raises(ManifestError, match="column 'caption_id' has null values"):
        captions.write(tmp_path, captions.table(with_null), images)
    as_ints = pa.table({"caption_id": [1], "image_id": ["a"], "split": ["train"], "text": ["x"]})
    with pytest.raises(ManifestError, match="differs from the expected"):
        captions.validate(as_ints, images, tmp_path)


def test_read_checks_the_file_it_finds(tmp_path, images):
    with pytest.raises(ManifestError, match=f"{tmp_path}/captions.parquet: missing"):
        captions.read(tmp_path)
    pq.write_table(pa.table({"caption_id": ["1"], "text": ["a dog"]}), tmp_path / CAPTIONS_FILE)
    with pytest.raises(ManifestError, match=r"missing columns \['image_id', 'split'\]"):
        captions.read(tmp_path)
    (tmp_path / CAPTIONS_FILE).write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        captions.read(tmp_path)
    # A caption written for an image that images.parquet no longer holds is caught on reading too.
    pq.write_table(captions.table(CAPTIONS), tmp_path / CAPTIONS_FILE)
    only_b = pa.Table.from_pylist(IMAGES[1:], schema=IMAGES_SCHEMA)
    with pytest.raises(ManifestError, match="caption '1' names image_id 'a', which is not in regions.parquet"):
        captions.read(tmp_path, only_b, images_name="regions.parquet")
