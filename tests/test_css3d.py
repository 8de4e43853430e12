"""CSS3D adapter: TIRG's query enumeration on a tiny annotation written in the real format (a pickled
dict in a .npy), a missing png, malformed records, expect_full, and CSS.zip served over local HTTP."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import zip_folder
from PIL import Image

from stages.datasets import manifest
from stages.common.errors import StageError
from stages.datasets import css3d
from stages.datasets.download import DownloadConfig

DOWNLOAD = DownloadConfig(workers=1, retries=0, backoff_seconds=0.0, timeout_seconds=5.0)


def annotation() -> dict:
    """Train without `labels` (TIRG then labels image i with i); test with labels, images 0 and 2 the
    same scene (label 10). Test image 4 gets no png."""
    obj = {"color": "red", "shape": "circle", "size": "large", "pos": [0.5, 0.5]}
    return {
        "train": {
            "objects_img": [[obj], [obj], [], [obj, obj]],
            "mods": [
                {"from": np.array([0, 1]), "to": np.array([1, 2]), "to_str": "add red circle"},
                {"from": [3], "to": [0], "to_str": "remove red circle"},
            ],
        },
        "test": {
            "objects_img": [[obj]] * 5,
            "labels": [10, 11, 10, 12, 13],
            "mods": [
                {"from": [0, 1], "to": [1, 3], "to_str": "make circle brown"},
                {"from": [2, 4], "to": [4, 1], "to_str": "add large object to top-left"},
            ],
        },
    }


def write_annotation(path: Path, data) -> None:
    np.save(path, np.array(data, dtype=object), allow_pickle=True)


def write_css(root: Path, data: dict | None = None, missing_png: tuple[str, int] | None = ("test", 4)) -> Path:
    """A CSS3D folder as the archive unpacks: the .npy and images/css_<split>_NNNNNN.png."""
    data = annotation() if data is None else data
    (root / "images").mkdir(parents=True, exist_ok=True)
    write_annotation(root / css3d.ANNOTATION_FILE, data)
    for split in ("train", "test"):
        for index in range(len(data[split]["objects_img"])):
            if (split, index) != missing_png:
                Image.new("RGB", (4, 4), (index * 40, 0, 0)).save(root / "images" / f"css_{split}_{index:06d}.png")
    return root


def config(raw_dir: Path, **changes) -> css3d.Config:
    return css3d.Config(**{"raw_dir": str(raw_dir), "archive_url": None, "expect_full": False, **changes})


def rows(table) -> dict[str, dict]:
    key = "image_id" if "image_id" in table.column_names else "query_id"
    return {row[key]: row for row in table.to_pylist()}


@pytest.fixture
def built(tmp_path):
    raw = write_css(tmp_path / "raw" / "css3d")
    out = tmp_path / "out"
    images, queries = css3d.build(config(raw), out, DOWNLOAD)
    return raw, out, images, queries


# ---------------------------------------------------------------- manifests


def test_images_are_the_pngs_captioned_by_label(built):
    raw, out, images, queries = built
    manifest.validate(images, queries)
    got = rows(images)
    assert list(got) == [f"css_train_{i:06d}" for i in range(4)] + [f"css_test_{i:06d}" for i in range(4)]
    assert got["css_test_000002"] == {
        "image_id": "css_test_000002", "path": "images/css_test_000002.png", "split": "test", "caption": "10",
    }
    assert [got[f"css_test_{i:06d}"]["caption"] for i in range(4)] == ["10", "11", "10", "12"]
    assert [got[f"css_train_{i:06d}"]["caption"] for i in range(4)] == ["0", "1", "2", "3"]  # no labels: index
    for row in got.values():
        assert os.path.samefile(out / row["path"], raw / row["path"])  # hard link, not a copy


def test_queries_enumerate_every_pair_of_every_mod(built):
    _, _, _, queries = built
    assert rows(queries) == {
        "train-000000-00": {"query_id": "train-000000-00", "split": "train", "reference_id": "css_train_000000",
                            "text": "add red circle", "target_id": "css_train_000001"},
        "train-000000-01": {"query_id": "train-000000-01", "split": "train", "reference_id": "css_train_000001",
                            "text": "add red circle", "target_id": "css_train_000002"},
        "train-000001-00": {"query_id": "train-000001-00", "split": "train", "reference_id": "css_train_000003",
                            "text": "remove red circle", "target_id": "css_train_000000"},
        "test-000000-00": {"query_id": "test-000000-00", "split": "test", "reference_id": "css_test_000000",
                           "text": "make circle brown", "target_id": "css_test_000001"},
        "test-000000-01": {"query_id": "test-000000-01", "split": "test", "reference_id": "css_test_000001",
                           "text": "make circle brown", "target_id": "css_test_000003"},
    }


def test_ingest_report_counts_missing_png_and_dropped_queries(built):
    raw, out, _, _ = built
    report = json.loads((out / "ingest_report.json").read_text())
    digest = hashlib.sha256((raw / css3d.ANNOTATION_FILE).read_bytes()).hexdigest()
    assert report["annotation_sha256"] == {css3d.ANNOTATION_FILE: digest}
    assert report["splits"]["test"] == {
        "images": 4, "missing_images": {"count": 1, "first": ["css_test_000004"]},
        "queries_read": 4, "queries_kept": 2, "dropped": {"missing_image": 2},
        "images_in_annotation": 5, "images_without_objects": 0, "mods": 2, "pairs": 4,
    }
    assert report["splits"]["train"]["images_without_objects"] == 1
    assert report["splits"]["train"]["queries_kept"] == 3
    assert report["dropped_queries"] == {"count": 2, "first": [
        {"query_id": "test-000001-00", "split": "test", "reason": "missing_image", "detail": "css_test_000004"},
        {"query_id": "test-000001-01", "split": "test", "reason": "missing_image", "detail": "css_test_000004"},
    ]}
    assert report["images_copied_not_linked"] == 0 and report["archive"] is None


def test_other_filesystem_copies_and_says_so_once(tmp_path, monkeypatch, capsys):
    raw = write_css(tmp_path / "raw")

    def cross_device(source, dest):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    images, _ = css3d.build(config(raw), tmp_path / "out", DOWNLOAD)
    assert capsys.readouterr().err.count("copying the images instead of hard-linking") == 1
    for path in images.column("path").to_pylist():
        assert (tmp_path / "out" / path).read_bytes() == (raw / path).read_bytes()
        assert not os.path.samefile(tmp_path / "out" / path, raw / path)
    report = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert report["images_copied_not_linked"] == 8


def test_a_link_error_other_than_no_link_support_is_raised(tmp_path, monkeypatch):
    raw = write_css(tmp_path / "raw")

    def too_many_links(source, dest):
        raise OSError(errno.EMLINK, "Too many links")

    monkeypatch.setattr(os, "link", too_many_links)
    with pytest.raises(OSError, match="Too many links"):
        css3d.build(config(raw), tmp_path / "out", DOWNLOAD)


# ---------------------------------------------------------------- bad or incomplete input


def test_expect_full_names_file_expected_and_found(tmp_path):
    raw = write_css(tmp_path / "raw")
    with pytest.raises(StageError, match=r"css_toy_dataset_novel2_small\.dup\.npy: expected 19,012 "
                                         r"train objects_img .*found 4"):
        css3d.build(config(raw, expect_full=True), tmp_path / "out", DOWNLOAD)


def test_unequal_from_and_to_names_file_and_mod(tmp_path):
    data = annotation()
    data["test"]["mods"][1]["to"] = [4]
    raw = write_css(tmp_path / "raw", data)
    with pytest.raises(StageError, match=r"dup\.npy: split 'test': mods\[1\]: 'from' lists 2 images but 'to' lists 1"):
        css3d.build(config(raw), tmp_path / "out", DOWNLOAD)


def test_index_out_of_range_and_missing_key_are_named(tmp_path):
    data = annotation()
    data["train"]["mods"][0]["to"] = [1, 9]
    write_css(tmp_path / "a", data)
    with pytest.raises(StageError, match=r"split 'train': mods\[0\]: image index 9 is not in 0\.\.3"):
        css3d.build(config(tmp_path / "a"), tmp_path / "out", DOWNLOAD)
    data = annotation()
    del data["test"]["mods"][0]["to_str"]
    write_css(tmp_path / "b", data)
    with pytest.raises(StageError, match=r"split 'test': mods\[0\]: missing key 'to_str'"):
        css3d.build(config(tmp_path / "b"), tmp_path / "out", DOWNLOAD)


def test_unreadable_annotation_is_a_stage_error(tmp_path):
    raw = write_css(tmp_path / "raw")
    (raw / css3d.ANNOTATION_FILE).write_bytes(b"not a numpy file")
    with pytest.raises(StageError, match=r"dup\.npy: not a readable pickled \.npy file"):
        css3d.build(config(raw), tmp_path / "out", DOWNLOAD)


def test_missing_data_without_url_says_where_to_get_it(tmp_path):
    with pytest.raises(StageError, match=r"missing css_toy_dataset_novel2_small\.dup\.npy.*drive\.google\.com/file/d/"
                                         r"1wPqMw-HKmXUG2qTgYBiTNUnjz83hA2tY"):
        css3d.build(config(tmp_path / "nothing"), tmp_path / "out", DOWNLOAD)


# ---------------------------------------------------------------- CSS.zip over HTTP


def test_archive_is_downloaded_and_extracted_once(tmp_path, server):
    served, base, requests = server
    zip_folder(write_css(tmp_path / "src"), served / "CSS.zip", "CSS/", {"__MACOSX/CSS/._images": b"junk"})
    raw = tmp_path / "raw"
    cfg = config(raw, archive_url=f"{base}/CSS.zip")
    first = css3d.build(cfg, tmp_path / "out1", DOWNLOAD)
    assert requests == ["/CSS.zip"]
    assert (raw / "CSS" / css3d.ANNOTATION_FILE).is_file() and not (raw / "__MACOSX").exists()
    report = json.loads((tmp_path / "out1" / "ingest_report.json").read_text())
    assert report["data_root"] == str(raw / "CSS")
    assert report["archive"]["sha256"] == hashlib.sha256((served / "CSS.zip").read_bytes()).hexdigest()
    (raw / "CSS" / "images" / "css_train_000000.png").touch()  # a re-extraction would overwrite this
    mtime = (raw / "CSS" / "images" / "css_train_000000.png").stat().st_mtime_ns
    second = css3d.build(cfg, tmp_path / "out2", DOWNLOAD)
    assert requests == ["/CSS.zip"]  # nothing fetched again
    assert (raw / "CSS" / "images" / "css_train_000000.png").stat().st_mtime_ns == mtime  # nothing extracted again
    assert first[0].equals(second[0]) and first[1].equals(second[1])


def test_archive_member_leaving_raw_dir_is_refused(tmp_path, server):
    served, base, _ = server
    with zipfile.ZipFile(served / "CSS.zip", "w") as zf:
        zf.writestr("CSS/ok.txt", b"fine")
        zf.writestr("../evil.txt", b"outside")
    raw = tmp_path / "deep" / "raw"
    with pytest.raises(StageError, match=r"CSS\.zip: member: path '\.\./evil\.txt' must be relative"):
        css3d.build(config(raw, archive_url=f"{base}/CSS.zip"), tmp_path / "out", DOWNLOAD)
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (raw / "CSS").exists()


def test_dead_archive_url_is_a_stage_error(tmp_path, server):
    _, base, _ = server
    with pytest.raises(StageError, match=r"CSS\.zip: download to .* missing: HTTP 404"):
        css3d.build(config(tmp_path / "raw", archive_url=f"{base}/CSS.zip"), tmp_path / "out", DOWNLOAD)


def test_extracted_files_removed_later_says_how_to_extract_again(tmp_path, server):
    served, base, _ = server
    zip_folder(write_css(tmp_path / "src"), served / "CSS.zip", "")
    raw = tmp_path / "raw"
    cfg = config(raw, archive_url=f"{base}/CSS.zip")
    css3d.build(cfg, tmp_path / "out1", DOWNLOAD)
    (raw / css3d.ANNOTATION_FILE).unlink()
    with pytest.raises(StageError, match=r"removed since \(delete .*/raw/\.CSS\.zip\.extracted\.json to extract"):
        css3d.build(cfg, tmp_path / "out2", DOWNLOAD)
