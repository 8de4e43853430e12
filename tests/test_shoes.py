"""Shoes adapter on the real annotation excerpts in shared/fixtures/shoes/ (read in place as raw_dir),
with generated JPEGs, nested like the unpacked attributedata archive, standing in for the images.
Expected counts are computed here from the fixture files with plain json reads."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
from pathlib import Path

import pytest

from shared_fixtures import FIXTURES, fixture
from PIL import Image

from stages.datasets import manifest
from stages.common.errors import StageError
from stages.datasets import shoes
from stages.datasets.shoes import Config
from stages.datasets.download import DownloadConfig

DOWNLOAD = DownloadConfig(workers=2, retries=0, backoff_seconds=0.0, timeout_seconds=5.0)
# Left out of the images folder: the reference of pair 0 (train) and the target of the last pair (eval).
LEFT_OUT_REFERENCE = "img_womens_clogs_512.jpg"


def fixture_dir() -> Path:
    return fixture("shoes")


def pairs() -> list[dict]:
    return json.loads((fixture_dir() / "relative_captions_shoes.json").read_text())


def names(file_name: str) -> list[str]:
    return (fixture_dir() / file_name).read_text().split()


def left_out() -> set[str]:
    return {LEFT_OUT_REFERENCE, pairs()[-1]["ImageName"]}


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 40, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_images(images_dir: Path, wanted: list[str], skip: set[str]) -> None:
    """Each image at attributedata/womens_<category>/<0|1>/<name>, as in the real archive."""
    for i, name in enumerate(wanted):
        if name in skip:
            continue
        category = re.fullmatch(r"img_womens_(.+)_\d+\.jpg", name)[1]
        path = images_dir / f"womens_{category}" / str(i % 2) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(i))


def config(raw_dir: Path, images_dir: Path, **changes) -> Config:
    values = dict(raw_dir=str(raw_dir), images_dir=str(images_dir), annotation_base_url=None, expect_full=False)
    return Config(**{**values, **changes})


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("attributedata")
    make_images(folder, names("train_im_names.txt") + names("eval_im_names.txt"), left_out())
    return folder


@pytest.fixture(scope="module")
def built(images_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    images, queries = shoes.build(config(fixture_dir(), images_dir), out, DOWNLOAD)
    return out, images, queries, json.loads((out / "ingest_report.json").read_text())


def test_reference_and_target_follow_the_file(built):
    """ImageName is the target, ReferenceImageName the reference (DATASETS.md §6)."""
    _, _, queries, _ = built
    rows = {q["query_id"]: q for q in queries.to_pylist()}
    # pair 1 of the fixture, by hand
    assert rows["shoes-train-00001"] == {
        "query_id": "shoes-train-00001", "split": "train", "reference_id": "img_womens_high_heels_848",
        "text": "has less strap design", "target_id": "img_womens_high_heels_838",
    }


def test_queries_per_split_match_the_name_lists(built):
    _, _, queries, report = built
    train, evaluation = set(names("train_im_names.txt")), set(names("eval_im_names.txt"))
    expected = {}
    for i, pair in enumerate(pairs()):
        both = {pair["ImageName"], pair["ReferenceImageName"]}
        split = "train" if both <= train else "test" if both <= evaluation else None
        if split and not both & left_out():
            expected[f"shoes-{split}-{i:05d}"] = (split, pair["RelativeCaption"].strip())
    rows = queries.to_pylist()
    assert {q["query_id"]: (q["split"], q["text"]) for q in rows} == expected
    assert sum(q["split"] == "train" for q in rows) == 31 and sum(q["split"] == "test" for q in rows) == 9
    assert report["splits"]["train"]["queries_read"] == 32 and report["splits"]["test"]["queries_read"] == 10
    assert report["splits"]["train"]["dropped"] == {"missing_image": 1}
    assert report["splits"]["test"]["dropped"] == {"missing_image": 1}
    assert report["pair_in_no_split"]["count"] == 0


def test_images_are_every_listed_name_present(built, images_dir):
    out, images, queries, report = built
    rows = {r["image_id"]: r for r in images.to_pylist()}
    listed = {n: "train" for n in names("train_im_names.txt")} | {n: "test" for n in names("eval_im_names.txt")}
    assert set(rows) == {n.removesuffix(".jpg") for n in listed if n not in left_out()}
    for name, split in listed.items():
        if name not in left_out():
            row = rows[name.removesuffix(".jpg")]
            assert row["split"] == split and row["path"] == f"images/{name}"
            assert os.path.samefile(out / row["path"], next(images_dir.rglob(name)))
    assert rows["img_womens_high_heels_848"]["caption"] == "black strappy high heels"  # captions_shoes.json #0
    assert rows["img_womens_clogs_851"]["caption"] == ""
    missing = sorted(name for split in ("train", "test") for name in report["splits"][split]["missing_images"]["first"])
    assert missing == sorted(n.removesuffix(".jpg") for n in left_out())
    manifest.validate(images, queries)


def test_report_has_sha256_of_the_annotation_files(built):
    _, _, _, report = built
    assert set(report["annotation_sha256"]) == set(shoes.ANNOTATION_FILES)
    for name, digest in report["annotation_sha256"].items():
        assert hashlib.sha256((fixture_dir() / name).read_bytes()).hexdigest() == digest


def test_missing_images_are_warned_with_the_dead_url(images_dir, tmp_path, capsys):
    shoes.build(config(fixture_dir(), images_dir), tmp_path / "out", DOWNLOAD)
    err = capsys.readouterr().err
    assert "2 of 123 images are not in" in err and LEFT_OUT_REFERENCE in err
    assert "tamaraberg.com/attributesDataset/attributedata.tar.gz" in err


def test_absent_or_empty_images_dir_is_an_error(tmp_path):
    with pytest.raises(StageError, match=r"(?s)images folder .*nowhere does not exist.*attributedata\.tar\.gz"):
        shoes.build(config(fixture_dir(), tmp_path / "nowhere"), tmp_path / "out", DOWNLOAD)
    (tmp_path / "empty").mkdir()
    first_eval_name = names("eval_im_names.txt")[0]
    with pytest.raises(StageError, match=rf"123 of 123 images are not in .*empty \(e\.g\. {first_eval_name}"):
        shoes.build(config(fixture_dir(), tmp_path / "empty"), tmp_path / "out", DOWNLOAD)


def write_annotations(raw: Path, pair_list: list[dict], train: list[str], evaluation: list[str]) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "relative_captions_shoes.json").write_text(json.dumps(pair_list))
    (raw / "train_im_names.txt").write_text("\n".join(train) + "\n")
    (raw / "eval_im_names.txt").write_text("\n".join(evaluation) + "\n")
    (raw / "captions_shoes.json").write_text("[]")


def test_malformed_record_names_file_and_record(tmp_path):
    broken = pairs()
    del broken[5]["ImageName"]
    write_annotations(tmp_path / "raw", broken, names("train_im_names.txt"), names("eval_im_names.txt"))
    path = tmp_path / "raw" / "relative_captions_shoes.json"
    with pytest.raises(StageError, match=rf"{path}: record 5: 'ImageName' must be a non-empty string"):
        shoes.build(config(tmp_path / "raw", tmp_path), tmp_path / "out", DOWNLOAD)


def test_self_pairs_and_pairs_across_lists_are_dropped(tmp_path):
    """Made-up pairs for the two cases the excerpt lacks (27 self pairs and 29 straddling pairs in the real data)."""
    a, b, c, d = (f"img_womens_boots_{i}.jpg" for i in range(4))
    pair_list = [
        {"ImageName": b, "ReferenceImageName": a, "RelativeCaption": " is taller "},
        {"ImageName": a, "ReferenceImageName": a, "RelativeCaption": "is the same"},
        {"ImageName": c, "ReferenceImageName": a, "RelativeCaption": "straddles the lists"},
        {"ImageName": d, "ReferenceImageName": c, "RelativeCaption": "   "},
    ]
    write_annotations(tmp_path / "raw", pair_list, [a, b], [c, d])
    make_images(tmp_path / "img", [a, b, c, d], set())
    images, queries = shoes.build(config(tmp_path / "raw", tmp_path / "img"), tmp_path / "out", DOWNLOAD)
    assert queries.to_pylist() == [{"query_id": "shoes-train-00000", "split": "train",
                                    "reference_id": "img_womens_boots_0", "text": "is taller",
                                    "target_id": "img_womens_boots_1"}]
    report = json.loads((tmp_path / "out/ingest_report.json").read_text())
    assert report["splits"]["train"]["dropped"] == {"reference_equals_target": 1}
    assert report["splits"]["test"]["dropped"] == {"empty_text": 1}
    assert report["pair_in_no_split"] == {"count": 1, "first": [2]}
    assert images.num_rows == 4


def test_a_name_found_twice_is_an_error(tmp_path):
    a, b = "img_womens_boots_0.jpg", "img_womens_boots_1.jpg"
    write_annotations(tmp_path / "raw", [{"ImageName": b, "ReferenceImageName": a, "RelativeCaption": "x"}], [a, b], [])
    make_images(tmp_path / "img", [a, b], set())
    (tmp_path / "img/copy").mkdir()
    (tmp_path / "img/copy" / a).write_bytes(jpeg(0))
    with pytest.raises(StageError, match=rf"image {a} is twice in"):
        shoes.build(config(tmp_path / "raw", tmp_path / "img"), tmp_path / "out", DOWNLOAD)


def test_expect_full_names_file_and_counts(images_dir, tmp_path):
    with pytest.raises(StageError, match=r"relative_captions_shoes\.json: expected 10,751 pairs .*found 42"):
        shoes.build(config(fixture_dir(), images_dir, expect_full=True), tmp_path / "out", DOWNLOAD)


def test_copy_when_hard_links_fail(images_dir, tmp_path, monkeypatch, capsys):
    def no_links(source, dest):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    images, _ = shoes.build(config(fixture_dir(), images_dir), tmp_path / "out", DOWNLOAD)
    assert capsys.readouterr().err.count("cannot hard-link") == 1
    first = images.to_pylist()[0]
    copy = tmp_path / "out" / first["path"]
    source = next(images_dir.rglob(Path(first["path"]).name))
    assert copy.read_bytes() == source.read_bytes() and not os.path.samefile(copy, source)
