"""Fashion200k adapter: TIRG's caption clean-up, test queries and sibling-caption training queries on
tiny label files in the real format, with the awkward cases (extra whitespace, duplicate captions, a
query image missing from the labels, a labelled image without its file), malformed lines, expect_full,
test_queries.txt over local HTTP and women.tar.gz extracted once."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from stages.datasets import manifest
from stages.common.errors import StageError
from stages.datasets import fashion200k
from stages.datasets.fashion200k import clean_caption, modification_text, parent_captions
from stages.datasets.download import DownloadConfig

DOWNLOAD = DownloadConfig(workers=1, retries=0, backoff_seconds=0.0, timeout_seconds=5.0)
D, T = "women/dresses", "women/tops/blouses"

LABELS = {
    "dress_train_detect_all.txt": (
        f"{D}/casual/100/100_0.jpeg\t0.91\tblue floral dress\n"
        f"{D}/casual/101/101_0.jpeg\t0.88\tblue floral dress\n"  # same caption as the line above
        f"{D}/casual/102/102_0.jpeg \t 0.75 \t  red floral dress  \t\r\n"  # extra whitespace, CRLF
        f"{D}/cocktail/103/103_0.jpeg\t0.5\tblack midi dress\n"
        f"{D}/cocktail/104/104_0.jpeg\t0.6\tDr. Martens & co? *new*\n"
        f"{D}/casual/105/105_0.jpeg\t0.7\tred floral dress\n"  # no file on disk
        "\n"
    ),
    "top_train_detect_all.txt": (
        f"{T}/200/200_0.jpeg\t0.9\twhite silk blouse\n"
        f"{D}/day/300/300_0.jpeg\t0.9\tgreen maxi dress\n"  # also a test image: stays in test
    ),
    "dress_test_detect_all.txt": (
        f"{D}/day/300/300_0.jpeg\t0.9\tgreen maxi dress\n"
        f"{D}/day/301/301_0.jpeg\t0.9\tpink maxi dress\n"
        f"{D}/day/302/302_0.jpeg\t0.9\tpink maxi dress\n"
        f"{D}/day/303/303_0.jpeg\t0.9\tgreen wrap dress\n"  # no file on disk
    ),
    "top_test_detect_all.txt": f"{T}/400/400_0.jpeg\t0.8\twhite lace blouse\n{T}/401/401_0.jpeg\t0.8\twhite silk blouse\n",
}
TEST_QUERIES = (
    f"{D}/day/300/300_0.jpeg {D}/day/301/301_0.jpeg\n"
    f"{D}/day/301/301_0.jpeg   {D}/day/300/300_0.jpeg\n"
    f"{T}/400/400_0.jpeg {T}/401/401_0.jpeg\n"
    f"{D}/day/300/300_0.jpeg {D}/day/999/999_0.jpeg\n"  # target not in the test labels
    f"{D}/day/303/303_0.jpeg {D}/day/300/300_0.jpeg\n"  # reference labelled but not on disk
    "\n"
)
ON_DISK = [f"{D}/casual/{i}/{i}_0.jpeg" for i in (100, 101, 102)] + [
    f"{D}/cocktail/103/103_0.jpeg", f"{D}/cocktail/104/104_0.jpeg", f"{T}/200/200_0.jpeg",
    f"{D}/day/300/300_0.jpeg", f"{D}/day/301/301_0.jpeg", f"{D}/day/302/302_0.jpeg",
    f"{T}/400/400_0.jpeg", f"{T}/401/401_0.jpeg",
]


def write_images(root: Path) -> None:
    for index, path in enumerate(ON_DISK):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 6), (index * 20, 0, 90)).save(root / path, format="JPEG")


def write_raw(raw_dir: Path, labels: dict[str, str] = LABELS, test_queries: str | None = TEST_QUERIES,
              images: bool = True) -> Path:
    (raw_dir / "labels").mkdir(parents=True)
    for name, text in labels.items():
        (raw_dir / "labels" / name).write_bytes(text.encode())
    if test_queries is not None:
        (raw_dir / "test_queries.txt").write_text(test_queries)
    if images:
        write_images(raw_dir)
    return raw_dir


def config(raw_dir: Path, **changes) -> fashion200k.Config:
    base = {"raw_dir": str(raw_dir), "test_queries_url": None, "expect_full": False, "seed": 0,
            "max_train_queries": None}
    return fashion200k.Config(**{**base, **changes})


@pytest.fixture
def built(tmp_path):
    raw = write_raw(tmp_path / "raw")
    images, queries = fashion200k.build(config(raw), tmp_path / "out", DOWNLOAD)
    return raw, tmp_path / "out", images, queries


# ---------------------------------------------------------------- TIRG's text rules


def test_caption_clean_up_and_word_difference_follow_tirg():
    assert clean_caption("  Dr. Martens & co? *new*\n") == "Drdotmark Martens andmark coquestionmark starmarknewstarmark"
    assert modification_text("blue floral dress", "red floral dress") == "replace blue with red"
    assert modification_text("white lace blouse", "white silk blouse") == "replace lace with silk"
    assert modification_text("red dress", "dress red") == "replace dress with red"  # none differs: last words
    # `replace` removes every occurrence of the word, inside other words too (TIRG's quirk)
    assert parent_captions("red dress with redwood buttons") == [
        "dress with wood buttons", "red with redwood buttons", "red dress redwood buttons",
        "red dress with buttons", "red dress with redwood"]


# ---------------------------------------------------------------- manifests


def test_images_keep_their_label_path_and_clean_caption(built):
    raw, out, images, queries = built
    manifest.validate(images, queries)
    by_id = {row["image_id"]: row for row in images.to_pylist()}
    assert sorted(by_id) == sorted(ON_DISK)
    assert by_id[f"{D}/casual/102/102_0.jpeg"] == {
        "image_id": f"{D}/casual/102/102_0.jpeg", "path": f"images/{D}/casual/102/102_0.jpeg",
        "split": "train", "caption": "red floral dress"}
    assert by_id[f"{D}/cocktail/104/104_0.jpeg"]["caption"] == "Drdotmark Martens andmark coquestionmark starmarknewstarmark"
    assert by_id[f"{D}/day/300/300_0.jpeg"]["split"] == "test"  # labelled in both splits: test wins
    assert by_id[f"{D}/day/301/301_0.jpeg"]["caption"] == by_id[f"{D}/day/302/302_0.jpeg"]["caption"]
    for row in by_id.values():
        assert os.path.samefile(out / row["path"], raw / row["image_id"])


def test_test_queries_come_from_test_queries_txt(built):
    _, _, _, queries = built
    assert [q for q in queries.to_pylist() if q["split"] == "test"] == [
        {"query_id": "test-000001", "split": "test", "reference_id": f"{D}/day/300/300_0.jpeg",
         "text": "replace green with pink", "target_id": f"{D}/day/301/301_0.jpeg"},
        {"query_id": "test-000002", "split": "test", "reference_id": f"{D}/day/301/301_0.jpeg",
         "text": "replace pink with green", "target_id": f"{D}/day/300/300_0.jpeg"},
        {"query_id": "test-000003", "split": "test", "reference_id": f"{T}/400/400_0.jpeg",
         "text": "replace lace with silk", "target_id": f"{T}/401/401_0.jpeg"},
    ]


def test_train_queries_join_sibling_captions(tmp_path, built):
    raw, _, images, queries = built
    caption = {row["image_id"]: row["caption"] for row in images.to_pylist()}
    train = [q for q in queries.to_pylist() if q["split"] == "train"]
    # modifiable: 100, 101 (blue floral dress) and 102 (red floral dress), siblings under "floral dress";
    # 105 (red floral dress) has no file, so it is not a target
    assert [q["reference_id"] for q in train] == [f"{D}/casual/{i}/{i}_0.jpeg" for i in (100, 101, 102)]
    assert [q["text"] for q in train] == ["replace blue with red"] * 2 + ["replace red with blue"]
    assert [caption[q["target_id"]] for q in train] == ["red floral dress"] * 2 + ["blue floral dress"]
    assert fashion200k.build(config(raw), tmp_path / "again", DOWNLOAD)[1].equals(queries)
    capped = fashion200k.build(config(raw, max_train_queries=2, seed=3), tmp_path / "capped", DOWNLOAD)[1]
    assert capped.column("split").to_pylist().count("train") == 2


def test_ingest_report(built):
    raw, out, _, _ = built
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["annotation_sha256"] == {
        path: hashlib.sha256((raw / path).read_bytes()).hexdigest()
        for path in ["labels/dress_test_detect_all.txt", "labels/dress_train_detect_all.txt",
                     "labels/top_test_detect_all.txt", "labels/top_train_detect_all.txt", "test_queries.txt"]
    }
    assert report["splits"]["test"] == {
        "images": 5, "missing_images": {"count": 1, "first": [f"{D}/day/303/303_0.jpeg"]},
        "queries_read": 5, "queries_kept": 3, "dropped": {"missing_image": 1, "not_in_test_labels": 1},
        "label_lines": 6,
    }
    assert report["splits"]["train"] == {
        "images": 6, "missing_images": {"count": 1, "first": [f"{D}/casual/105/105_0.jpeg"]},
        "queries_read": 3, "queries_kept": 3, "dropped": {}, "label_lines": 8,
        "unique_captions": 5, "modifiable_images": 3,
    }
    assert report["dropped_queries"]["first"] == [
        {"query_id": "test-000004", "split": "test", "reason": "not_in_test_labels", "detail": f"{D}/day/999/999_0.jpeg"},
        {"query_id": "test-000005", "split": "test", "reason": "missing_image", "detail": f"{D}/day/303/303_0.jpeg"},
    ]
    assert report["duplicate_label_lines"] == {"count": 1, "first": [
        f"labels/top_train_detect_all.txt:2: {D}/day/300/300_0.jpeg (first at labels/dress_test_detect_all.txt:1)"]}
    assert report["blank_label_lines"] == 1 and report["label_lines_with_extra_fields"] == 0
    assert report["archive"] is None


# ---------------------------------------------------------------- bad or incomplete input


@pytest.mark.parametrize("line, message", [
    (f"{D}/x/1/1_0.jpeg\t0.5", r"dress_test_detect_all\.txt:2: expected 'image path<TAB>detection score<TAB>"),
    (f"{D}/x/1/1_0.jpeg 0.5 red dress", r"dress_test_detect_all\.txt:2: expected 'image path<TAB>"),
    (f"{D}/x/1/1_0.jpeg\thigh\tred dress", r"dress_test_detect_all\.txt:2: detection score 'high' is not a number"),
    ("../outside.jpeg\t0.5\tred dress", r"dress_test_detect_all\.txt:2: path '\.\./outside\.jpeg' must be relative"),
])
def test_malformed_label_line_names_file_and_line(tmp_path, line, message):
    labels = {**LABELS, "dress_test_detect_all.txt": f"{D}/day/300/300_0.jpeg\t0.9\tgreen maxi dress\n{line}\n"}
    raw = write_raw(tmp_path / "raw", labels)
    with pytest.raises(StageError, match=message):
        fashion200k.build(config(raw), tmp_path / "out", DOWNLOAD)


def test_malformed_test_query_line_names_file_and_line(tmp_path):
    raw = write_raw(tmp_path / "raw", test_queries=f"{D}/day/300/300_0.jpeg {D}/day/301/301_0.jpeg extra\n")
    with pytest.raises(StageError, match=r"test_queries\.txt:1: expected 'source_image_path target_image_path'"):
        fashion200k.build(config(raw), tmp_path / "out", DOWNLOAD)


def test_expect_full_checks_documented_counts(tmp_path):
    raw = write_raw(tmp_path / "raw")
    with pytest.raises(StageError, match=r"labels/\*test\*: expected 29,789 test label lines .*found 6"):
        fashion200k.build(config(raw, expect_full=True), tmp_path / "out", DOWNLOAD)


def test_missing_manual_parts_print_the_drive_link(tmp_path):
    with pytest.raises(StageError, match=r"labels: missing; download labels/ and women\.tar\.gz by hand from the "
                                         r"Google Drive folder https://drive\.google\.com/drive/folders/"):
        fashion200k.build(config(tmp_path / "raw"), tmp_path / "out", DOWNLOAD)
    raw = write_raw(tmp_path / "raw2", test_queries=None)
    with pytest.raises(StageError, match=r"test_queries\.txt: missing; set test_queries_url, or download it from "
                                         r"https://storage\.googleapis\.com/image_retrieval_css/test_queries\.txt"):
        fashion200k.build(config(raw), tmp_path / "out", DOWNLOAD)


# ---------------------------------------------------------------- test_queries.txt over HTTP, women.tar.gz


def test_test_queries_are_downloaded_once(tmp_path, server):  # noqa: F811
    served, base, requests = server
    (served / "test_queries.txt").write_text(TEST_QUERIES)
    raw = write_raw(tmp_path / "raw", test_queries=None)
    cfg = config(raw, test_queries_url=f"{base}/test_queries.txt")
    first = fashion200k.build(cfg, tmp_path / "out1", DOWNLOAD)
    assert requests == ["/test_queries.txt"]
    assert (raw / "test_queries.txt").read_text() == TEST_QUERIES
    second = fashion200k.build(cfg, tmp_path / "out2", DOWNLOAD)
    assert requests == ["/test_queries.txt"]
    assert first[1].equals(second[1])


def test_images_archive_is_extracted_once(tmp_path):
    write_images(tmp_path / "src")
    raw = write_raw(tmp_path / "raw", images=False)
    with tarfile.open(raw / "women.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "src" / "women", arcname="women")
    images, _ = fashion200k.build(config(raw), tmp_path / "out1", DOWNLOAD)
    assert images.num_rows == len(ON_DISK)
    report = json.loads((tmp_path / "out1" / "ingest_report.json").read_text())
    assert report["archive"]["sha256"] == hashlib.sha256((raw / "women.tar.gz").read_bytes()).hexdigest()
    marker = raw / ".women.tar.gz.extracted.json"
    stamp = marker.stat().st_mtime_ns
    (raw / ON_DISK[0]).unlink()  # an extraction would bring it back
    images, _ = fashion200k.build(config(raw), tmp_path / "out2", DOWNLOAD)
    assert images.num_rows == len(ON_DISK) - 1 and marker.stat().st_mtime_ns == stamp


def test_images_archive_leaving_raw_dir_is_refused(tmp_path):
    raw = write_raw(tmp_path / "raw", images=False)
    with tarfile.open(raw / "women.tar.gz", "w:gz") as tf:
        member = tarfile.TarInfo("../evil.jpeg")
        member.size = 3
        tf.addfile(member, io.BytesIO(b"bad"))
    with pytest.raises(StageError, match=r"women\.tar\.gz: a member would be written outside"):
        fashion200k.build(config(raw), tmp_path / "out", DOWNLOAD)
    assert not (tmp_path / "evil.jpeg").exists()
