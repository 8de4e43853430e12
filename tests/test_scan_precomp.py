"""SCAN precomp reader on the real caption excerpts (coco testall/dev, f30k train/dev) and the real
vse_infty f30k id_mapping.json; the ids and .npy files (never found as real copies) are written here."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared_fixtures import FIXTURES, fixture

from stages.datasets import captions
from stages.common.errors import StageError
from stages.common.errors import ManifestError
from stages.datasets import scan_precomp
from stages.datasets.scan_precomp import read_id_mapping, read_lines, read_split

COCO = FIXTURES / "scan_precomp" / "coco_precomp"
F30K = FIXTURES / "scan_precomp" / "f30k_precomp"
ID_MAPPING = FIXTURES / "flickr30k" / "id_mapping.json"


@pytest.fixture(autouse=True, scope="module")
def fixtures_present():
    for needed in (COCO / "testall_caps.txt", F30K / "train_caps.txt", F30K / "dev_caps.txt", ID_MAPPING):
        fixture(str(needed.relative_to(FIXTURES)))


def f30k_copy(tmp_path: Path, rows_per_image: dict[str, int], first_id: dict[str, int] | None = None) -> Path:
    """The real f30k caption excerpts (50 lines = 10 images each) plus written ids and features:
    one row per image (1) or per caption (5, as f30k dev); ids = Karpathy imgids first_id..first_id+9."""
    folder = tmp_path / "f30k_precomp"
    folder.mkdir()
    for split, repeat in rows_per_image.items():
        shutil.copy(F30K / f"{split}_caps.txt", folder)
        start = (first_id or {}).get(split, 0)
        ids = [image for image in range(start, start + 10) for _ in range(repeat)]
        (folder / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in ids))
        np.save(folder / f"{split}_ims.npy", np.zeros((len(ids), 36, 8), dtype=np.float32))
    return folder


def test_real_caption_files_read_as_five_lines_per_image():
    split = read_split(COCO, "testall")
    assert (len(split.captions), split.images, split.rows, split.rows_per_image) == (50, 10, 10, 1)
    assert split.captions[0] == "A man with a red helmet on a small moped on a dirt road ."
    assert split.ids is None and split.features is None
    assert read_lines(F30K / "train_caps.txt")[:2] == [
        "Two young guys with shaggy hair look at their hands while hanging out in the yard .",
        "Two young , White males are outside near many bushes .",
    ]


def test_a_last_line_without_lf_counts_once(tmp_path):
    text = (F30K / "test_caps.txt").read_text(encoding="utf-8")
    (tmp_path / "test_caps.txt").write_text(text.rstrip("\n"), encoding="utf-8")  # as in the full original
    assert read_lines(tmp_path / "test_caps.txt") == read_lines(F30K / "test_caps.txt")
    assert len(read_lines(tmp_path / "test_caps.txt")) == 50


def test_f30k_ids_map_to_karpathy_file_names(tmp_path):
    folder = f30k_copy(tmp_path, {"train": 1, "dev": 5}, first_id={"dev": 10})
    out = tmp_path / "out"
    features = scan_precomp.ingest(
        folder, out, {"train": "train", "dev": "val"}, names=read_id_mapping(ID_MAPPING)
    )
    regions, table, features_read = scan_precomp.read(out)
    assert features_read == features
    assert features["train"]["shape"] == [10, 36, 8] and features["train"]["rows_per_image"] == 1
    assert features["val"]["shape"] == [50, 36, 8] and features["val"]["rows_per_image"] == 5
    assert features["train"]["features"] == str(folder / "train_ims.npy")
    # Karpathy imgid 0 is 1000092795.jpg; its five captions are train lines 1-5 (PROVENANCE.md).
    assert regions.slice(0, 3).to_pylist() == [
        {"image_id": "1000092795", "split": "train", "row": 0},
        {"image_id": "10002456", "split": "train", "row": 1},
        {"image_id": "1000268201", "split": "train", "row": 2},
    ]
    train_lines = read_lines(F30K / "train_caps.txt")
    assert captions.by_image(table)["1000092795"] == train_lines[:5]
    assert table.slice(5, 1).to_pylist() == [
        {"caption_id": "train-000005", "image_id": "10002456", "split": "train", "text": train_lines[5]}
    ]
    # dev repeats each image's row once per caption: image k starts at row 5k.
    dev = [r for r in regions.to_pylist() if r["split"] == "val"]
    assert [r["row"] for r in dev] == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert dev[0]["image_id"] == "1001573224"  # id_mapping["10"]


def test_same_image_in_two_splits_is_an_error(tmp_path):
    folder = f30k_copy(tmp_path, {"train": 1, "dev": 5})  # both use ids 0..9
    with pytest.raises(ManifestError, match="regions.parquet: duplicate image_id '0'"):
        scan_precomp.ingest(folder, tmp_path / "out", {"train": "train", "dev": "val"})


def test_coco_captions_without_ids_get_positional_image_ids(tmp_path):
    out = tmp_path / "out"
    scan_precomp.ingest(COCO, out, {"testall": "test", "dev": "val"})
    regions, table, features = scan_precomp.read(out)
    assert regions.num_rows == 20 and table.num_rows == 100
    assert regions.to_pylist()[0] == {"image_id": "testall-000000", "split": "test", "row": 0}
    assert captions.by_image(table)["testall-000000"][0] == "A man with a red helmet on a small moped on a dirt road ."
    assert captions.by_image(table)["dev-000000"][0] == "A child holding a flowered umbrella and petting a yak ."
    assert features["test"]["features"] is None and features["test"]["images"] == 10
    assert features["test"]["captions_sha256"] == scan_precomp.sha256_of(COCO / "testall_caps.txt")


def test_row_checks(tmp_path):
    folder = f30k_copy(tmp_path, {"train": 1})
    np.save(folder / "train_ims.npy", np.zeros((11, 36, 8), dtype=np.float32))
    with pytest.raises(StageError, match=r"train_ids.txt: 10 ids but .*train_ims.npy has 11 rows"):
        read_split(folder, "train")
    (folder / "train_ids.txt").unlink()
    with pytest.raises(StageError, match=r"train_caps.txt: 50 captions for 11 feature rows; expected 11 .* or 55"):
        read_split(folder, "train")
    (folder / "train_ims.npy").write_bytes(b"not numpy")
    with pytest.raises(StageError, match="train_ims.npy: not a readable .npy array"):
        read_split(folder, "train")


def test_repeated_rows_must_carry_one_id(tmp_path):
    folder = f30k_copy(tmp_path, {"dev": 5})
    ids = (folder / "dev_ids.txt").read_text().splitlines()
    ids[7] = "3"  # row 7 belongs to image 1 (rows 5..9)
    (folder / "dev_ids.txt").write_text("\n".join(ids) + "\n")
    with pytest.raises(StageError, match=r"dev_ids.txt:6: rows 5..9 repeat image 1 .* got \[1, 1, 3, 1, 1\]"):
        scan_precomp.ingest(folder, tmp_path / "out", {"dev": "val"})


def test_bad_inputs_name_the_file(tmp_path):
    folder = f30k_copy(tmp_path, {"train": 1})
    with pytest.raises(StageError, match=r"train_ids.txt:10: id 9 is not in the id mapping"):
        scan_precomp.ingest(folder, tmp_path / "out", {"train": "train"}, names={i: f"{i}.jpg" for i in range(9)})
    (folder / "train_ids.txt").write_text("0\n1\nx\n")
    with pytest.raises(StageError, match=r"train_ids.txt:3: expected an integer id, got 'x'"):
        read_split(folder, "train")
    with pytest.raises(StageError, match=r"test_caps.txt: missing"):
        read_split(folder, "test")
    lines = read_lines(F30K / "dev_caps.txt")[:7]
    (folder / "dev_caps.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(StageError, match="dev_caps.txt: 7 lines, expected a positive multiple of 5"):
        read_split(folder, "dev")
    with pytest.raises(StageError, match="two SCAN splits map to one manifest split"):
        scan_precomp.ingest(COCO, tmp_path / "out", {"test": "test", "testall": "test"})
    (tmp_path / "map.json").write_text('["0.jpg"]')
    with pytest.raises(StageError, match="map.json: not an id mapping"):
        read_id_mapping(tmp_path / "map.json")


def test_blank_caption_line_is_skipped_but_keeps_its_index(tmp_path):
    folder = tmp_path / "precomp"
    folder.mkdir()
    lines = read_lines(F30K / "test_caps.txt")
    lines[3] = "  "
    (folder / "test_caps.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    features = scan_precomp.ingest(folder, tmp_path / "out", {"test": "test"})
    table = scan_precomp.read(tmp_path / "out")[1]
    assert table.num_rows == 49 and "test-000003" not in table["caption_id"].to_pylist()
    assert table["caption_id"].to_pylist()[3] == "test-000004"
    assert features["test"]["blank_captions"] == 1
    assert json.loads((tmp_path / "out" / "features.json").read_text())["test"]["captions"] == 50
