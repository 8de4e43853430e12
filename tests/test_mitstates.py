"""MIT-States adapter: TIRG's folder rules (spaces in names, 'adj <noun>' skipped, the 49 test nouns),
its test-query enumeration, seeded training queries, malformed folders, and the zip over local HTTP
(with a corrupt member, as the real zip is reported to have)."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
from conftest import zip_folder
from PIL import Image

from stages.datasets import manifest
from stages.common.errors import StageError
from stages.datasets import mitstates
from stages.datasets.download import DownloadConfig

DOWNLOAD = DownloadConfig(workers=1, retries=0, backoff_seconds=0.0, timeout_seconds=5.0)

# Folder -> files. 'clock' is a test noun, 'building' and 'apple' are not; file names keep their case.
FOLDERS = {
    "ancient building": ["b1.jpg", "b2.jpg"],
    "new building": ["b3.jpg"],
    "adj building": ["b4.jpg"],  # no state label: skipped
    "ripe apple": ["IMG_1.jpg"],
    "sliced apple": ["IMG_2.jpg"],
    "rotten apple": ["IMG_3.jpg"],
    "broken clock": ["a.jpg", "b.jpg"],
    "new clock": ["c.jpg"],
    "old clock": ["d.jpg", ".DS_Store"],  # hidden file: skipped
    "weird": ["x.jpg"],  # no space in the name: skipped
}


def write_tree(raw_dir: Path, folders: dict[str, list[str]] = FOLDERS) -> Path:
    images = raw_dir / "release_dataset" / "images"
    for folder, files in folders.items():
        (images / folder).mkdir(parents=True, exist_ok=True)
        for index, name in enumerate(files):
            if name.endswith(".jpg"):
                Image.new("RGB", (4, 4), (index * 50, 90, 0)).save(images / folder / name, format="JPEG")
            else:
                (images / folder / name).write_bytes(b"\0")
    (images / "notes.txt").write_text("a file among the folders: no space, skipped\n")
    return raw_dir


def config(raw_dir: Path, **changes) -> mitstates.Config:
    base = {"raw_dir": str(raw_dir), "archive_url": None, "expect_full": False, "seed": 0,
            "train_queries_per_image": 2}
    return mitstates.Config(**{**base, **changes})


def caption_of(images, image_id: str) -> str:
    return {row["image_id"]: row["caption"] for row in images.to_pylist()}[image_id]


@pytest.fixture
def built(tmp_path):
    raw = write_tree(tmp_path / "raw")
    images, queries = mitstates.build(config(raw), tmp_path / "out", DOWNLOAD)
    return raw, tmp_path / "out", images, queries


def test_images_by_folder_split_by_test_nouns(built):
    raw, out, images, queries = built
    manifest.validate(images, queries)
    by_id = {row["image_id"]: row for row in images.to_pylist()}
    assert sorted(by_id) == sorted([
        "ancient building/b1.jpg", "ancient building/b2.jpg", "new building/b3.jpg",
        "ripe apple/IMG_1.jpg", "sliced apple/IMG_2.jpg", "rotten apple/IMG_3.jpg",
        "broken clock/a.jpg", "broken clock/b.jpg", "new clock/c.jpg", "old clock/d.jpg",
    ])
    assert by_id["broken clock/b.jpg"] == {"image_id": "broken clock/b.jpg", "path": "images/broken clock/b.jpg",
                                           "split": "test", "caption": "broken clock"}
    assert by_id["ripe apple/IMG_1.jpg"]["split"] == "train"
    assert by_id["ripe apple/IMG_1.jpg"]["caption"] == "ripe apple"
    for row in by_id.values():
        assert os.path.samefile(out / row["path"], raw / "release_dataset" / row["path"])


def test_test_queries_pair_each_image_with_every_other_adjective(built):
    _, _, _, queries = built
    test = [(q["query_id"], q["reference_id"], q["text"], q["target_id"])
            for q in queries.to_pylist() if q["split"] == "test"]
    # the target is the first image (sorted) of "<adj> clock"; any image of that caption is correct
    assert test == [
        ("test-000000", "broken clock/a.jpg", "new", "new clock/c.jpg"),
        ("test-000001", "broken clock/a.jpg", "old", "old clock/d.jpg"),
        ("test-000002", "broken clock/b.jpg", "new", "new clock/c.jpg"),
        ("test-000003", "broken clock/b.jpg", "old", "old clock/d.jpg"),
        ("test-000004", "new clock/c.jpg", "broken", "broken clock/a.jpg"),
        ("test-000005", "new clock/c.jpg", "old", "old clock/d.jpg"),
        ("test-000006", "old clock/d.jpg", "broken", "broken clock/a.jpg"),
        ("test-000007", "old clock/d.jpg", "new", "new clock/c.jpg"),
    ]


def test_train_queries_change_the_adjective_and_are_seeded(tmp_path, built):
    raw, _, images, queries = built
    train = [q for q in queries.to_pylist() if q["split"] == "train"]
    # building: 3 images, one other adjective each; apple: 3 images, two other adjectives each
    assert len(train) == 3 + 6
    for q in train:
        source_adj, noun = caption_of(images, q["reference_id"]).split()
        assert q["text"] != source_adj
        assert caption_of(images, q["target_id"]) == f"{q['text']} {noun}"
    again = mitstates.build(config(raw), tmp_path / "again", DOWNLOAD)[1]
    assert again.equals(queries)
    one_each = mitstates.build(config(raw, train_queries_per_image=1, seed=5), tmp_path / "one", DOWNLOAD)[1]
    assert one_each.column("split").to_pylist().count("train") == 6


def test_ingest_report(built):
    _, out, _, _ = built
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["splits"]["test"] == {
        "images": 4, "missing_images": {"count": 0, "first": []}, "queries_read": 8, "queries_kept": 8,
        "dropped": {}, "nouns": 1, "captions": 3,
    }
    assert report["splits"]["train"]["images"] == 6 and report["splits"]["train"]["nouns"] == 2
    assert report["skipped_folders"] == {
        "'adj <noun>': no state label": {"count": 1, "first": ["adj building"]},
        "name without a space": {"count": 2, "first": ["notes.txt", "weird"]},
    }
    assert report["hidden_files_skipped"] == {"count": 1, "first": ["old clock/.DS_Store"]}
    assert report["adjectives"] == 7
    ids = sorted(f"{folder}/{name}" for folder, files in FOLDERS.items() if " " in folder and folder.split()[0] != "adj"
                 for name in files if not name.startswith("."))
    assert report["listing_sha256"] == hashlib.sha256("\n".join(ids).encode()).hexdigest()


# ---------------------------------------------------------------- bad or incomplete input


def test_non_jpg_file_names_the_file(tmp_path):
    raw = write_tree(tmp_path / "raw", {**FOLDERS, "new clock": ["c.jpg", "c.png"]})
    with pytest.raises(StageError, match=r"new clock/c\.png: not a \.jpg image"):
        mitstates.build(config(raw), tmp_path / "out", DOWNLOAD)


def test_folder_of_three_words_is_named(tmp_path):
    raw = write_tree(tmp_path / "raw", {**FOLDERS, "very old clock": ["e.jpg"]})
    with pytest.raises(StageError, match=r"folder name 'very old clock' is not '<adjective> <noun>'"):
        mitstates.build(config(raw), tmp_path / "out", DOWNLOAD)


def test_noun_with_one_adjective_is_named(tmp_path):
    raw = write_tree(tmp_path / "raw", {**FOLDERS, "red wheel": ["w.jpg"]})
    with pytest.raises(StageError, match=r"noun 'wheel' has images of one adjective only \('red wheel'\)"):
        mitstates.build(config(raw), tmp_path / "out", DOWNLOAD)


def test_expect_full_wants_all_49_test_nouns(tmp_path):
    raw = write_tree(tmp_path / "raw")
    with pytest.raises(StageError, match=r"test nouns: expected images of all 49 .* found 1 \(missing: armor, "):
        mitstates.build(config(raw, expect_full=True), tmp_path / "out", DOWNLOAD)


def test_missing_images_folder_says_where_to_get_it(tmp_path):
    with pytest.raises(StageError, match=r"missing the images folder .*states_and_transformations"):
        mitstates.build(config(tmp_path / "empty"), tmp_path / "out", DOWNLOAD)


# ---------------------------------------------------------------- release_dataset.zip over HTTP


def corrupt_member(archive: Path, name: str) -> None:
    """Flip the first data byte of a stored member, so that reading it fails its CRC check."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(name)
    data = bytearray(archive.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length] ^= 0xFF
    archive.write_bytes(bytes(data))


def test_zip_is_fetched_once_and_corrupt_members_are_reported(tmp_path, server):  # noqa: F811
    served, base, requests = server
    source = write_tree(tmp_path / "src")
    zip_folder(source, served / "release_dataset.zip", "", {"__MACOSX/release_dataset/._images": b"junk"})
    corrupt_member(served / "release_dataset.zip", "release_dataset/images/broken clock/b.jpg")
    raw = tmp_path / "raw"
    cfg = config(raw, archive_url=f"{base}/release_dataset.zip")
    images, queries = mitstates.build(cfg, tmp_path / "out1", DOWNLOAD)
    assert requests == ["/release_dataset.zip"]
    assert "broken clock/b.jpg" not in images.column("image_id").to_pylist()
    assert queries.column("split").to_pylist().count("test") == 6  # a -> new, old; c, d -> two each
    report = json.loads((tmp_path / "out1" / "ingest_report.json").read_text())
    assert report["archive"]["unreadable_members"] == ["release_dataset/images/broken clock/b.jpg"]
    assert not (raw / "__MACOSX").exists()
    again = mitstates.build(cfg, tmp_path / "out2", DOWNLOAD)
    assert requests == ["/release_dataset.zip"]
    assert again[0].equals(images) and again[1].equals(queries)
