"""CIRR adapter on the real annotation excerpts in shared/fixtures/cirr/ (read in place as raw_dir),
with generated PNGs at the relative paths of the split files standing in for the NLVR2 images.
Expected counts are computed here from the fixture files with plain json reads."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from shared_fixtures import FIXTURES, fixture
from PIL import Image

from stages.datasets import manifest
from stages.common.errors import StageError
from stages.datasets import cirr
from stages.datasets.cirr import Config
from stages.datasets.download import DownloadConfig

DOWNLOAD = DownloadConfig(workers=2, retries=0, backoff_seconds=0.0, timeout_seconds=5.0)
LEFT_OUT = "dev-1028-1-img1"  # target_hard of val pairid 12060 (record 0)


def fixture_dir() -> Path:
    return fixture("cirr")


def load(relative: str):
    return json.loads((fixture_dir() / relative).read_text())


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 120, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_images(images_dir: Path, split_map: dict[str, str], skip: set[str]) -> None:
    for i, (name, relative) in enumerate(split_map.items()):
        if name not in skip:
            path = images_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(i))


def config(raw_dir: Path, images_dir: Path, **changes) -> Config:
    values = dict(raw_dir=str(raw_dir), images_dir=str(images_dir), annotation_base_url=None,
                  splits=["val", "test1"], expect_full=False)
    return Config(**{**values, **changes})


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nlvr2")
    for split in ("val", "test1"):
        make_images(folder, load(f"image_splits/split.rc2.{split}.json"), {LEFT_OUT})
    return folder


@pytest.fixture(scope="module")
def built(images_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    images, queries = cirr.build(config(fixture_dir(), images_dir), out, DOWNLOAD)
    return out, images, queries, json.loads((out / "ingest_report.json").read_text())


def test_val_queries_are_the_pairs_with_their_hard_target(built):
    _, _, queries, report = built
    rows = {q["query_id"]: q for q in queries.to_pylist()}
    expected = {
        f"cirr-val-{p['pairid']}": (p["reference"], p["target_hard"], p["caption"])
        for p in load("captions/cap.rc2.val.json")
        if LEFT_OUT not in (p["reference"], p["target_hard"])
    }
    assert {k: (q["reference_id"], q["target_id"], q["text"]) for k, q in rows.items()} == expected
    assert {q["split"] for q in rows.values()} == {"val"}
    # pairid 12060 (DATASETS.md §10 example) names the left-out image; 12062 is the next record, by hand
    assert "cirr-val-12060" not in rows
    assert rows["cirr-val-12062"]["reference_id"] == "dev-63-0-img1"
    assert rows["cirr-val-12062"]["target_id"] == "dev-430-3-img0"
    val = report["splits"]["val"]
    dropped = 30 - len(expected)
    assert val["queries_read"] == 30 and val["queries_kept"] == len(expected)
    assert val["dropped"] == {"missing_image": dropped} and dropped >= 1
    assert val["missing_images"] == {"count": 1, "first": [LEFT_OUT]}


def test_test1_has_images_and_no_queries(built):
    _, images, _, report = built
    test1 = report["splits"]["test1"]
    assert test1["queries_read"] == 30 and test1["queries_kept"] == 0 and test1["dropped"] == {"no_target": 30}
    names = {r["image_id"] for r in images.to_pylist() if r["split"] == "test1"}
    assert names == set(load("image_splits/split.rc2.test1.json"))


def test_images_keep_names_and_relative_paths(built, images_dir):
    out, images, queries, _ = built
    rows = {r["image_id"]: r for r in images.to_pylist()}
    val_map = load("image_splits/split.rc2.val.json")
    assert {k for k, r in rows.items() if r["split"] == "val"} == set(val_map) - {LEFT_OUT}
    row = rows["dev-244-0-img0"]
    assert row == {"image_id": "dev-244-0-img0", "path": "images/dev/dev-244-0-img0.png", "split": "val", "caption": ""}
    assert os.path.samefile(out / row["path"], images_dir / "dev/dev-244-0-img0.png")
    manifest.validate(images, queries)


def test_report_has_sha256_of_the_annotation_files(built):
    _, _, _, report = built
    assert len(report["annotation_sha256"]) == 4
    for relative, digest in report["annotation_sha256"].items():
        assert hashlib.sha256((fixture_dir() / relative).read_bytes()).hexdigest() == digest


def test_missing_train_captions_say_where_to_get_them(images_dir, tmp_path):
    """The excerpt has split.rc2.train.json but not cap.rc2.train.json (too large to vendor)."""
    with pytest.raises(StageError, match=r"(?s)missing:.*cap\.rc2\.train\.json.*Cuberick-Orion/CIRR"):
        cirr.build(config(fixture_dir(), images_dir, splits=["train"]), tmp_path / "out", DOWNLOAD)


def test_absent_images_dir_names_the_nlvr2_form(tmp_path):
    with pytest.raises(StageError, match=r"(?s)images folder .*does not exist.*lil-lab/nlvr"):
        cirr.build(config(fixture_dir(), tmp_path / "nowhere"), tmp_path / "out", DOWNLOAD)


def copy_split(raw: Path, split: str) -> tuple[Path, Path]:
    """The fixture files of `split` in a temporary raw_dir, to be broken by a test."""
    paths = []
    for relative in (f"captions/cap.rc2.{split}.json", f"image_splits/split.rc2.{split}.json"):
        (raw / relative).parent.mkdir(parents=True, exist_ok=True)
        (raw / relative).write_bytes((fixture_dir() / relative).read_bytes())
        paths.append(raw / relative)
    return paths[0], paths[1]


def test_malformed_record_names_file_and_record(images_dir, tmp_path):
    captions, _ = copy_split(tmp_path, "val")
    records = json.loads(captions.read_text())
    records[7]["pairid"] = "12070"
    captions.write_text(json.dumps(records))
    with pytest.raises(StageError, match=rf"{captions}: record 7: 'pairid' must be an integer"):
        cirr.build(config(tmp_path, images_dir, splits=["val"]), tmp_path / "out", DOWNLOAD)
    records[7]["pairid"] = records[0]["pairid"]
    captions.write_text(json.dumps(records))
    with pytest.raises(StageError, match=rf"{captions}: record 7: pairid 12060 appears twice"):
        cirr.build(config(tmp_path, images_dir, splits=["val"]), tmp_path / "out", DOWNLOAD)


def test_unlisted_target_and_climbing_path_are_errors(images_dir, tmp_path):
    captions, split_map = copy_split(tmp_path, "val")
    entries = json.loads(split_map.read_text())
    del entries["dev-63-0-img1"]
    split_map.write_text(json.dumps(entries))
    with pytest.raises(StageError, match=rf"{captions}: record 1 \(pairid 12062\): reference dev-63-0-img1 is not in"):
        cirr.build(config(tmp_path, images_dir, splits=["val"]), tmp_path / "out", DOWNLOAD)
    entries["dev-63-0-img1"] = "../../etc/dev-63-0-img1.png"
    split_map.write_text(json.dumps(entries))
    with pytest.raises(StageError, match=r"must be relative and must not contain '\.\.'"):
        cirr.build(config(tmp_path, images_dir, splits=["val"]), tmp_path / "out", DOWNLOAD)


def test_expect_full_names_file_and_counts(images_dir, tmp_path):
    with pytest.raises(StageError, match=r"cap\.rc2\.val\.json: expected 4,181 pairs .*found 30"):
        cirr.build(config(fixture_dir(), images_dir, expect_full=True), tmp_path / "out", DOWNLOAD)
