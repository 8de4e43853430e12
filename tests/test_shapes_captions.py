"""The COCO-shaped shapes matching set: splits, 5 partial captions per image that name only objects of their scene,
1K-style folds on test, the same manifests as COCO's, same bytes for the same params."""
import json
import re

import pyarrow.parquet as pq
import pytest

from stages.common.params import ParamsError, parse
from stages.datasets import captions as captions_manifest
from stages.datasets import shapes_captions as sc
from stages.datasets.shapes import CELLS

SMALL = dict(image_size=24, train_images=60, val_images=10, test_images=20, novel_images=10, folds=4)

# The wording, written out here independently of the adapter's word lists.
COLOUR = {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "purple": "purple", "violet": "purple",
          "cyan": "cyan", "turquoise": "cyan", "orange": "orange", "gray": "gray", "grey": "gray"}
SHAPE = {"circle": "circle", "disc": "circle", "round shape": "circle", "square": "square", "box": "square",
         "block": "square", "triangle": "triangle", "wedge": "triangle"}
SIZE = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
OBJECT = re.compile(rf"\ban? (?:(?P<size>{'|'.join(SIZE)}) )?(?P<colour>{'|'.join(COLOUR)}) "
                    rf"(?P<shape>{'|'.join(sorted(SHAPE, key=len, reverse=True))})\b")


def named_objects(text):
    return [(SIZE.get(m["size"]), COLOUR[m["colour"]], SHAPE[m["shape"]]) for m in OBJECT.finditer(text)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_captions")
    images, queries = sc.build(sc.Config(**SMALL), out)
    return out, images, queries


def test_splits_counts_and_held_out_pairs():
    held_out, scenes = sc.generate(sc.Config(**SMALL))
    counts = {split: sum(1 for s, _ in scenes.values() if s == split) for split in sc.SPLITS}
    assert counts == {"train": 60, "val": 10, "test": 20, "novel": 10}
    held = {tuple(pair.split()) for pair in held_out}
    assert len(held) == 4
    for split, scene in scenes.values():
        combos = {(o.shape, o.colour) for o in scene if o is not None}
        assert 2 <= sum(o is not None for o in scene) <= 5
        assert bool(combos & held) == (split == "novel"), (split, scene)


def test_five_distinct_partial_captions_name_only_objects_of_their_scene(built):
    out, images, _ = built
    _, scenes = sc.generate(sc.Config(**SMALL))
    table = pq.read_table(out / captions_manifest.CAPTIONS_FILE).to_pylist()
    assert len(table) == 5 * images.num_rows
    by_image = {}
    for row in table:
        by_image.setdefault(row["image_id"], []).append(row["text"])
        assert row["split"] == scenes[row["image_id"]][0]
    named_counts = []
    for image_id, texts in by_image.items():
        assert len(texts) == len(set(texts)) == 5
        scene = scenes[image_id][1]
        objects = [o for o in scene if o is not None]
        for text in texts:
            named = named_objects(text)
            assert 1 <= len(named) <= 3, text
            for size, colour, shape in named:  # every named object is in the scene (size when given)
                assert any(o.colour == colour and o.shape == shape and size in (None, o.size) for o in objects), text
            named_counts.append(len(named) / len(objects))
    assert min(named_counts) < 1 and sum(named_counts) / len(named_counts) < 0.8  # partial descriptions
    assert images.column("caption").to_pylist() == [by_image[i][0] for i in images.column("image_id").to_pylist()]


def test_wording_varies_across_templates_and_synonyms(built):
    out, _, _ = built
    texts = pq.read_table(out / captions_manifest.CAPTIONS_FILE).column("text").to_pylist()
    joined = " | ".join(texts)
    for word in ("above", "below", "to the left of", "among them", "there is", "corner", "grey", "disc", "block", "big"):
        assert word in joined, word
    assert len({t.split()[0] for t in texts}) >= 5  # sentences open in several ways


def test_folds_cut_the_test_split_and_the_manifests_validate(built):
    out, images, queries = built
    folds = json.loads((out / captions_manifest.FOLDS_FILE).read_text())
    test_ids = [i for i, s in zip(images.column("image_id").to_pylist(), images.column("split").to_pylist())
                if s == "test"]
    assert list(folds) == ["0", "1", "2", "3"] and sum(folds.values(), []) == test_ids
    assert {len(v) for v in folds.values()} == {5}
    assert queries.num_rows == 0
    captions_manifest.validate(pq.read_table(out / captions_manifest.CAPTIONS_FILE), images, out)
    assert all((out / p).is_file() for p in images.column("path").to_pylist())
    summary = json.loads((out / "shapes_captions.json").read_text())
    assert summary["images"] == {"novel": 10, "test": 20, "val": 10, "train": 60}
    assert summary["folds"] == {"count": 4, "images_per_fold": 5, "left_over": 0}


def test_same_params_same_bytes(tmp_path, built):
    out, _, _ = built
    sc.build(sc.Config(**SMALL), tmp_path)
    for name in (captions_manifest.CAPTIONS_FILE, captions_manifest.FOLDS_FILE):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    other = sc.Config(**{**SMALL, "seed": 1})
    assert sc.generate(other)[1].keys() != sc.generate(sc.Config(**SMALL))[1].keys()


def test_bad_params_name_the_field():
    with pytest.raises(ParamsError, match=r"dataset\.shapes_captions\.folds.*cannot cut 20 test images into 30"):
        parse(sc.Config, "dataset.shapes_captions", {**SMALL, "folds": 30})
    with pytest.raises(ParamsError, match=r"dataset\.shapes_captions\.test_images"):
        parse(sc.Config, "dataset.shapes_captions", {**SMALL, "test_images": 0})
    with pytest.raises(ParamsError, match="train_images: could draw only"):
        sc.generate(sc.Config(**{**SMALL, "min_objects": CELLS, "max_objects": CELLS, "novel_combos": 23,
                                 "train_images": 1000}))  # one allowed pair, 2 sizes, 9 cells: 512 scenes
