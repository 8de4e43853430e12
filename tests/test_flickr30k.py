"""Flickr30k-Karpathy adapter: a hand-written dataset_flickr30k.json (file names from the real vse_infty
id_mapping.json excerpt) + tiny JPEGs; the form-gated images are never fetched, missing ones are named."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shared_fixtures import FIXTURES, fixture
from karpathy_files import DOWNLOAD, five, record, write_jpeg, write_karpathy

from stages.datasets import captions, manifest
from stages.common.errors import StageError
from stages.datasets import flickr30k
from stages.common.params import parse

ID_MAPPING = FIXTURES / "flickr30k" / "id_mapping.json"

FIRST_RAWS = [  # Karpathy imgid 0 (DATASETS.md §8; its SCAN captions are f30k train_caps lines 1-5)
    "Two young guys with shaggy hair look at their hands while hanging out in the yard.",
    "Two young, White males are outside near many bushes. ",
    "Two men in green shirts are standing in a yard.",
    " A man in a blue shirt standing in a garden.",
    "Two friends enjoy time spent together.",
]
SPLITS = ["train", "train", "val", "test", "train", "test"]  # interleaved, as in the real file
MISSING_INDEX = 4


@pytest.fixture(scope="module")
def filenames() -> list[str]:
    fixture(str(ID_MAPPING.relative_to(FIXTURES)))
    mapping = json.loads(ID_MAPPING.read_text())
    return [mapping[str(i)] for i in range(len(SPLITS))]


@pytest.fixture
def raw(tmp_path, filenames) -> Path:
    raw = tmp_path / "raw"
    records = [
        record(i, name, split, FIRST_RAWS if i == 0 else five(f"photo {name}"), 5 * i)
        for i, (name, split) in enumerate(zip(filenames, SPLITS))
    ]
    write_karpathy(raw / "dataset_flickr30k.json", records, "flickr30k")
    for i, name in enumerate(filenames):
        if i != MISSING_INDEX:
            write_jpeg(raw / "flickr30k-images" / name, name)
    return raw


def config(raw: Path, **changes) -> flickr30k.Config:
    return flickr30k.Config(**{"raw_dir": str(raw), "images_dir": str(raw / "flickr30k-images"), **changes})


def test_missing_images_are_named_with_where_to_get_them(raw, tmp_path, filenames):
    with pytest.raises(StageError) as err:
        flickr30k.build(config(raw), tmp_path / "out", DOWNLOAD)
    message = str(err.value)
    assert "flickr30k: 1 of 6 images are missing under" in message and "(train 1)" in message
    assert str(raw / "flickr30k-images" / filenames[MISSING_INDEX]) in message
    assert "form-gated" in message and "http://shannon.cs.illinois.edu/DenotationGraph/" in message
    assert not (tmp_path / "out" / "captions.parquet").exists()


def test_absent_images_dir_is_said_plainly(raw, tmp_path):
    absent = tmp_path / "nowhere"
    with pytest.raises(StageError, match=f"{absent}: images_dir not found; Flickr30k images are form-gated"):
        flickr30k.build(config(raw, images_dir=str(absent)), tmp_path / "out", DOWNLOAD)


def test_build_with_dropped_missing_image(raw, tmp_path, filenames):
    out = tmp_path / "out"
    images, queries = flickr30k.build(config(raw, on_missing="drop"), out, DOWNLOAD)
    manifest.write(out, images, queries)
    assert queries.num_rows == 0
    expected_ids = [Path(name).stem for i, name in enumerate(filenames) if i != MISSING_INDEX]
    assert images["image_id"].to_pylist() == expected_ids == ["1000092795", "10002456", "1000268201", "1000344755",
                                                              "1000523639"]
    assert images["split"].to_pylist() == ["train", "train", "val", "test", "test"]
    assert images["path"].to_pylist()[0] == "images/1000092795.jpg"
    assert images["caption"].to_pylist()[0] == FIRST_RAWS[0]
    for path in images["path"].to_pylist():
        assert os.path.samefile(out / path, raw / "flickr30k-images" / Path(path).name)

    table = captions.read(out)
    assert table.num_rows == 25
    assert captions.by_image(table)["1000092795"] == [
        FIRST_RAWS[0],
        "Two young, White males are outside near many bushes.",
        "Two men in green shirts are standing in a yard.",
        "A man in a blue shirt standing in a garden.",
        "Two friends enjoy time spent together.",
    ]
    assert table["caption_id"].to_pylist()[:6] == ["0", "1", "2", "3", "4", "5"]
    assert not (out / "folds.json").exists()  # Flickr30K 1K is the whole test split

    report = json.loads((out / "ingest_report.json").read_text())
    assert report["dataset"] == "flickr30k"
    assert report["karpathy_splits"] == {"train": 3, "val": 1, "test": 2}
    assert report["images"] == {"test": 2, "train": 2, "val": 1}
    assert report["captions"] == {"test": 10, "train": 10, "val": 5}
    assert report["missing_images"] == [{"image_id": "1000366164", "file": "1000366164.jpg", "split": "train"}]


def test_record_keys_of_coco_are_not_required(raw, tmp_path):
    data = json.loads((raw / "dataset_flickr30k.json").read_text())
    assert all("filepath" not in r for r in data["images"])
    data["images"][2]["sentences"] = "not a list"
    (raw / "dataset_flickr30k.json").write_text(json.dumps(data))
    with pytest.raises(StageError, match=r"dataset_flickr30k.json: images\[2\]: field 'sentences' should be a list"):
        flickr30k.build(config(raw, on_missing="drop"), tmp_path / "out", DOWNLOAD)


def test_expect_full_and_defaults(raw, tmp_path):
    with pytest.raises(StageError, match=r"31014 images \{'train': 29000, 'val': 1014, 'test': 1000\}, found 6"):
        flickr30k.build(config(raw, expect_full=True), tmp_path / "out", DOWNLOAD)
    cfg = parse(flickr30k.Config, "dataset.flickr30k", {})
    assert (cfg.raw_dir, cfg.images_dir) == ("data/raw/flickr30k", "data/raw/flickr30k/flickr30k-images")
