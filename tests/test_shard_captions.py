"""Image-text matching shards: every caption of every image in the gallery json, folds.json beside the
shards, and matching_batches pairing each caption with its image."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from stages.datasets import captions, manifest
from stages import shard
from stages.shards import store
from stages.common.atomic import write_json
from stages.common.errors import StageError
from stages.shards.loaders import decode_image, matching_batches
from stages.common.errors import ManifestError
from stages.common.params import parse
from stages.resize import ResizeConfig, run_resize
from test_shard import config, image_bytes, write_resized

IMAGES = [("000009", "train", "jpg"), ("000025", "train", "png"), ("000030", "train", "jpg")]
CAPTIONS_PER_IMAGE = {"000009": 5, "000025": 5, "000030": 2}
FOLDS = {"0": ["000009", "000025"], "1": ["000030"]}


def caption_rows() -> list[dict[str, str]]:
    """COCO-like captions (sentid-style ids), interleaved across images as a file may have them."""
    rows = [
        {"caption_id": str(770000 + 10 * n + k), "image_id": image_id, "split": "train",
         "text": f"caption {k} of image {image_id}"}
        for n, (image_id, count) in enumerate(CAPTIONS_PER_IMAGE.items()) for k in range(count)
    ]
    random.Random(0).shuffle(rows)
    return rows


def expected_captions(rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """Images in manifest order, each image's captions in file order."""
    return [(r["caption_id"], image_id, r["text"]) for image_id, _, _ in IMAGES for r in rows if r["image_id"] == image_id]


def prepare(root: Path, rows: list[dict[str, str]] | None, folds: dict | None = None) -> Path:
    """A prepared COCO-like folder: images + manifest (+ captions.parquet, folds.json), resized to 8 px."""
    prepared = write_resized(root / "prepared", IMAGES, [])
    if rows is not None:
        captions.write(prepared, captions.table(rows), manifest.read(prepared)[0])
    if folds is not None:
        write_json(prepared / captions.FOLDS_FILE, folds)
    cfg = parse(ResizeConfig, "resize", dict(size=8, mode="center_crop", pad_value=0, format="png",
                                             jpeg_quality=90))
    run_resize(prepared, root / "resized", cfg)
    return root / "resized"


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    """(shard dir, caption rows) of the tiny COCO-like dataset, in shards of 2 images."""
    root, rows = tmp_path_factory.mktemp("coco"), caption_rows()
    shard.run_shard(prepare(root, rows, FOLDS), root / "shards", config(maxcount=2))
    return root / "shards", rows


def test_gallery_json_lists_every_caption_in_captions_file_order(coco):
    out, rows = coco
    assert len(store.shard_paths(out, "train", "gallery")) == 2
    assert list(store.iter_captions(out, "train")) == expected_captions(rows)
    gallery = list(store.iter_gallery(out, "train"))  # the single manifest caption is still there
    assert [(image_id, caption) for image_id, caption, _ in gallery] == [(i, f"caption of {i}") for i, _, _ in IMAGES]


def test_without_a_captions_file_each_image_has_its_manifest_caption(tmp_path):
    shard.run_shard(prepare(tmp_path, None), tmp_path / "shards", config())
    assert list(store.iter_captions(tmp_path / "shards", "train")) == [
        (image_id, image_id, f"caption of {image_id}") for image_id, _, _ in IMAGES
    ]


def test_shards_written_before_captions_existed_read_as_one_caption(tmp_path):
    old_sample = {"__key__": "a", "png": image_bytes(9, "PNG"), "json": b'{"caption": "a red cube", "image_id": "a"}'}
    out = tmp_path / "shards"
    entry = store.write_shards(out, "train", "gallery", [old_sample], 10, 10**6)
    write_json(out / store.INDEX_FILE, {"format": store.INDEX_FORMAT, "splits": {
        "train": {"gallery": entry, "queries": {"count": 0, "shards": []}}}})
    assert list(store.iter_captions(out, "train")) == [("a", "a", "a red cube")]
    batch = next(matching_batches(out, "train", 1, 4, seed=0, workers=0))
    assert (batch["caption_id"], batch["image_id"], batch["text"]) == (["a"], ["a"], ["a red cube"])
    assert store.read_folds(out) is None


def test_an_image_without_a_caption_is_an_error_naming_file_and_image(tmp_path):
    rows = [r for r in caption_rows() if r["image_id"] != "000025"]
    resized = prepare(tmp_path, rows)
    with pytest.raises(ManifestError, match=rf"{resized / 'captions.parquet'}: image '000025' \(split 'train'\) "
                                            "has no caption"):
        shard.run_shard(resized, tmp_path / "shards", config())
    assert not (tmp_path / "shards").exists()


def test_folds_json_is_copied_listed_read_back_and_verified(coco, tmp_path):
    out, _ = coco
    folds_file = out / "folds.json"
    index = store.read_index(out)
    assert index["folds"] == {"file": "folds.json", "sha256": hashlib.sha256(folds_file.read_bytes()).hexdigest()}
    assert folds_file.read_bytes() == (out.parent / "resized/folds.json").read_bytes()
    assert store.read_folds(out) == FOLDS
    store.verify(out)

    copy = tmp_path / "shards"
    copy.mkdir()
    for path in out.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(out)).write_bytes(path.read_bytes())
    (copy / "folds.json").write_text(json.dumps({"0": ["000009"]}))
    with pytest.raises(StageError, match="folds.json: sha256 differs from index.json"):
        store.verify(copy)
    (copy / "folds.json").unlink()
    with pytest.raises(StageError, match="folds.json: file listed in index.json is missing"):
        store.verify(copy)


def test_no_folds_file_no_folds_and_a_bad_one_is_an_error(tmp_path):
    resized = prepare(tmp_path, caption_rows())
    shard.run_shard(resized, tmp_path / "shards", config())
    assert "folds" not in store.read_index(tmp_path / "shards")
    assert store.read_folds(tmp_path / "shards") is None
    (resized / "folds.json").write_text(json.dumps({"0": "000009"}))
    with pytest.raises(StageError, match=r"folds.json: not a folds file"):
        shard.run_shard(resized, tmp_path / "other", config())


def test_matching_batches_give_every_pair_once_an_epoch_reproducibly(coco):
    out, rows = coco
    pairs = sorted((image_id, caption_id) for caption_id, image_id, _ in expected_captions(rows))
    text_of = {r["caption_id"]: r["text"] for r in rows}

    def two_epochs(seed):
        stream = matching_batches(out, "train", 4, 16, seed=seed, workers=0)
        return [next(stream) for _ in range(6)]  # 12 pairs = 3 batches an epoch

    a, b = two_epochs(0), two_epochs(0)
    ids = [list(zip(batch["image_id"], batch["caption_id"])) for batch in a]
    assert ids == [list(zip(batch["image_id"], batch["caption_id"])) for batch in b]
    assert sorted(sum(ids[:3], [])) == pairs and sorted(sum(ids[3:], [])) == pairs
    assert ids[:3] != ids[3:]  # each epoch reshuffles
    other = two_epochs(1)
    assert [list(zip(batch["image_id"], batch["caption_id"])) for batch in other] != ids

    images = {image_id: decode_image(data) for image_id, _, data in store.iter_gallery(out, "train")}
    for batch in a:
        assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.float32
        assert batch["text"] == [text_of[c] for c in batch["caption_id"]]
        for row, image_id in enumerate(batch["image_id"]):
            assert torch.equal(batch["image"][row], images[image_id])


def test_matching_batches_need_one_full_batch(coco):
    out, _ = coco
    with pytest.raises(ValueError, match="split 'train' has fewer image-caption pairs than one batch of 13"):
        next(matching_batches(out, "train", 13, 16, seed=0, workers=0))
