"""The shapes generator: deterministic, deduplicated, split-disjoint, novel where it claims to be,
and every instruction says exactly what changes between reference and target."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter

import pytest
from PIL import Image

from stages.datasets import manifest
from stages.datasets import shapes
from stages.datasets.shapes import (
    ALL_COMBOS,
    CELLS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Config,
    Obj,
    caption,
    image_id,
    parse_caption,
)
from stages.common.params import ParamsError, parse

SMALL = dict(
    seed=0,
    image_size=32,
    min_objects=2,
    max_objects=5,
    train_queries=60,
    test_queries=20,
    novel_queries=20,
    novel_combos=4,
    queries_per_reference=4,
    eval_gallery_size=0,
    val_queries=0,
    val_gallery_size=0,
)


def small_config(**changes) -> Config:
    return Config(**{**SMALL, **changes})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small dataset built on disk: (out_dir, images table, queries table, generated data)."""
    out = tmp_path_factory.mktemp("shapes")
    images, queries = shapes.build(small_config(val_queries=10, val_gallery_size=30), out)
    return out, images, queries, shapes.generate(small_config(val_queries=10, val_gallery_size=30))


def image_files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())}


# ---------------------------------------------------------------- instructions, parsed independently

_OBJ = rf"(?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})"
_POS = "|".join(POSITIONS)
INSTRUCTIONS = {
    "add": re.compile(rf"add a {_OBJ} at (?P<at>{_POS})"),
    "remove": re.compile(rf"remove the {_OBJ} at (?P<at>{_POS})"),
    "move": re.compile(rf"move the {_OBJ} from (?P<at>{_POS}) to (?P<to>{_POS})"),
    "size": re.compile(rf"make the {_OBJ} at (?P<at>{_POS}) (?P<new>{'|'.join(SIZES)})"),
    "colour": re.compile(rf"make the {_OBJ} at (?P<at>{_POS}) (?P<new>{'|'.join(COLOURS)})"),
}


def apply_instruction(scene, text):
    """(kind, target scene, named object in its target state) that `text` asks for, applied to `scene`."""
    for kind, pattern in INSTRUCTIONS.items():
        if m := pattern.fullmatch(text):
            break
    else:
        raise AssertionError(f"unparseable instruction {text!r}")
    cells = list(scene)
    obj = Obj(m["size"], m["colour"], m["shape"])
    at = POSITIONS.index(m["at"])
    if kind == "add":
        assert cells[at] is None, f"{text!r}: cell is not empty"
        cells[at] = obj
        return kind, tuple(cells), obj
    assert cells[at] == obj, f"{text!r}: the reference has {cells[at]} there"
    if kind == "remove":
        cells[at] = None
        return kind, tuple(cells), obj
    if kind == "move":
        to = POSITIONS.index(m["to"])
        assert cells[to] is None, f"{text!r}: destination is not empty"
        cells[at], cells[to] = None, obj
        return kind, tuple(cells), obj
    changed = obj._replace(**{"size" if kind == "size" else "colour": m["new"]})
    assert changed != obj, f"{text!r} changes nothing"
    cells[at] = changed
    return kind, tuple(cells), changed


# ---------------------------------------------------------------- tests


def test_manifests_validate_and_have_exact_counts(built):
    out, images, queries, _ = built
    manifest.validate(images, queries, out)
    counts = {split: queries.column("split").to_pylist().count(split) for split in shapes.SPLITS}
    assert counts == {"train": 60, "test": 20, "novel": 20, "val": 10}
    for q in queries.to_pylist():
        split, number = q["query_id"].split("-")
        assert split == q["split"] and re.fullmatch(r"\d{6}", number)
    for row in images.to_pylist():
        assert row["path"] == f"images/{row['image_id']}.png"
        with Image.open(out / row["path"]) as image:
            assert image.size == (32, 32) and image.format == "PNG"
    assert len(image_files(out)) == images.num_rows  # nothing else under images/


def test_same_seed_gives_identical_bytes(built, tmp_path):
    out, images, queries, _ = built
    images2, queries2 = shapes.build(small_config(val_queries=10, val_gallery_size=30), tmp_path)
    assert images2.equals(images) and queries2.equals(queries)
    assert image_files(tmp_path) == image_files(out)
    assert (tmp_path / "shapes.json").read_bytes() == (out / "shapes.json").read_bytes()


def test_different_seed_gives_different_data(built):
    *_, data = built
    other = shapes.generate(small_config(seed=1))
    assert set(other.scenes) != set(data.scenes)
    assert [q.text for q in other.queries] != [q.text for q in data.queries]


def test_identical_scenes_share_one_image(built):
    out, images, _, data = built
    assert list(data.scenes) == images.column("image_id").to_pylist()
    assert len({shapes.scene_key(s) for s in data.scenes.values()}) == len(data.scenes)
    scene = parse_caption("a large red circle at top-left, a small blue square at centre")
    assert image_id(scene) == image_id(parse_caption(caption(scene)))
    assert re.fullmatch(r"shapes-[0-9a-f]{16}", image_id(scene))
    pixels = {}
    for name in image_files(out):
        with Image.open(out / "images" / name) as image:
            digest = hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()
        assert digest not in pixels, f"{name} and {pixels.get(digest)} have identical pixels"
        pixels[digest] = name


def test_every_single_object_renders_distinctly_even_at_16_px():
    seen = {}
    for cell in range(CELLS):
        for shape, colour in ALL_COMBOS:
            for size in SIZES:
                scene = tuple(Obj(size, colour, shape) if c == cell else None for c in range(CELLS))
                key = shapes.render(scene, 16).tobytes()
                assert key not in seen, f"{scene[cell]} at {cell} looks like {seen.get(key)}"
                seen[key] = scene


def test_splits_are_disjoint(built):
    _, images, queries, _ = built
    split_of = {row["image_id"]: row["split"] for row in images.to_pylist()}
    pairs_by_split: dict[str, set] = {split: set() for split in shapes.SPLITS}
    for q in queries.to_pylist():
        assert split_of[q["reference_id"]] == q["split"] == split_of[q["target_id"]]
        pair = (q["reference_id"], q["text"])
        assert pair not in pairs_by_split[q["split"]], f"duplicate query {pair}"
        pairs_by_split[q["split"]].add(pair)
    assert all(not (pairs_by_split[a] & pairs_by_split[b]) for a in shapes.SPLITS for b in shapes.SPLITS if a < b)
    assert all(pairs_by_split.values())


def test_novel_split_is_really_novel(built):
    out, images, queries, data = built
    held_out = {tuple(pair) for pair in json.loads((out / "shapes.json").read_text())["held_out_combos"]}
    assert held_out == set(data.held_out) and len(held_out) == 4
    for row in images.to_pylist():
        if row["split"] != "novel":
            combos = {obj.combo for obj in parse_caption(row["caption"]) if obj}
            assert not combos & held_out, f"{row['split']} image {row['image_id']} uses a held-out pair"
    captions = {row["image_id"]: row["caption"] for row in images.to_pylist()}
    for q in queries.to_pylist():
        if q["split"] == "novel":
            _, _, named = apply_instruction(parse_caption(captions[q["reference_id"]]), q["text"])
            assert named.combo in held_out, f"{q['query_id']}: {q['text']!r} names no held-out pair"
    assert all(q.named.combo in held_out for q in data.queries if q.split == "novel")


def test_instruction_is_exactly_the_difference(built):
    _, images, queries, _ = built
    captions = {row["image_id"]: row["caption"] for row in images.to_pylist()}
    kinds = set()
    for q in queries.to_pylist():
        reference = parse_caption(captions[q["reference_id"]])
        kind, expected, _ = apply_instruction(reference, q["text"])
        assert parse_caption(captions[q["target_id"]]) == expected, f"{q['query_id']}: {q['text']!r}"
        kinds.add(kind)
    assert kinds == set(shapes.KINDS)


def test_generated_queries_agree_with_their_text(built):
    *_, data = built
    for q in data.queries:
        kind, target, named = apply_instruction(q.reference, q.text)
        assert (kind, target, named) == (q.kind, q.target, q.named)


def test_object_counts_stay_in_bounds(built):
    _, images, *_ = built
    counts = {sum(obj is not None for obj in parse_caption(c)) for c in images.column("caption").to_pylist()}
    assert counts <= set(range(2, 6)) and {2, 5} <= counts


def test_equal_bounds_allow_only_in_place_edits():
    data = shapes.generate(small_config(min_objects=3, max_objects=3))
    assert {q.kind for q in data.queries} == {"colour", "size", "move"}
    assert all(sum(o is not None for o in s) == 3 for s in data.scenes.values())


def test_full_grid_allows_colour_and_size_only():
    data = shapes.generate(small_config(min_objects=9, max_objects=9))
    assert {q.kind for q in data.queries} == {"colour", "size"}


def test_distractors_grow_the_eval_galleries_and_leave_the_queries_alone():
    plain, grown = shapes.generate(small_config()), shapes.generate(small_config(eval_gallery_size=150))
    assert grown.queries == plain.queries  # the same queries, ids, references and targets
    counts = Counter(grown.split_of.values())
    assert counts["test"] == counts["novel"] == 150
    assert {i for i, s in grown.split_of.items() if s == "train"} == {i for i, s in plain.split_of.items() if s == "train"}
    assert set(plain.scenes) <= set(grown.scenes)
    held_out = set(grown.held_out)
    targets = {shapes.image_id(q.target) for q in grown.queries}
    distractors = [i for i in grown.scenes if i not in plain.scenes]
    before = Counter(plain.split_of.values())
    assert len(distractors) == 300 - before["test"] - before["novel"] and not set(distractors) & targets
    for i in distractors:
        scene = grown.scenes[i]
        assert shapes.image_id(scene) == i and grown.split_of[i] in ("test", "novel")
        n = sum(obj is not None for obj in scene)
        assert 2 <= n <= 5
        if grown.split_of[i] == "test":  # held-out pairs stay out of every split but novel
            assert not {obj.combo for obj in scene if obj} & held_out
    # near misses of a target of their split (at most two cells differ: a move touches two), not random scenes
    near = sum(any(sum(a != b for a, b in zip(grown.scenes[i], q.target)) <= 2 for q in grown.queries
                   if q.split == grown.split_of[i]) for i in distractors)
    assert near > 0.6 * len(distractors)
    # a near miss of a non-remove query keeps every object but the named one
    query = next(q for q in grown.queries if q.kind == "colour")
    misses = shapes.near_misses(query, small_config(), list(grown.held_out) if query.split == "novel" else
                                [c for c in shapes.ALL_COMBOS if c not in held_out])
    assert misses and query.target not in misses
    for miss in misses:
        differing = [cell for cell in range(shapes.CELLS) if miss[cell] != query.target[cell]]
        assert all(query.target[cell] in (None, query.named) for cell in differing)


def test_an_unreachable_gallery_size_is_a_clear_error():
    with pytest.raises(ParamsError, match="eval_gallery_size"):
        shapes.generate(small_config(min_objects=1, max_objects=1, eval_gallery_size=10_000))


def test_caption_round_trip_and_rejects_other_text():
    scene = parse_caption("a large red circle at top-left, a small blue square at centre")
    assert scene[0] == Obj("large", "red", "circle") and scene[4] == Obj("small", "blue", "square")
    assert caption(scene) == "a large red circle at top-left, a small blue square at centre"
    with pytest.raises(ValueError):
        parse_caption("a huge red circle at top-left")


def test_unreachable_query_count_is_a_clear_error():
    # One allowed (shape, colour) pair and one object per scene: far fewer than 1000 distinct queries.
    cfg = small_config(min_objects=1, max_objects=1, novel_combos=23, train_queries=1000)
    with pytest.raises(ParamsError, match=r"dataset\.shapes\.train_queries: could draw only \d+ of 1000"):
        shapes.generate(cfg)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"colours": 8}, r"dataset\.shapes\.colours: unknown key"),
        ({"image_size": "32"}, r"dataset\.shapes\.image_size: .*integer"),
        ({"seed": 1.5}, r"dataset\.shapes\.seed: "),
        ({"min_objects": 4, "max_objects": 3}, r"max_objects: must be in min_objects"),
        ({"min_objects": 0}, r"min_objects: must be in 1\.\.9"),
        ({"max_objects": 10}, r"max_objects: "),
        ({"image_size": 8}, r"image_size: must be at least 16"),
        ({"test_queries": 0}, r"test_queries: must be > 0"),
        ({"novel_combos": 24}, r"novel_combos: must be in 1\.\.23"),
        ({"novel_combos": 0}, r"novel_combos: "),
        ({"eval_gallery_size": -1}, r"eval_gallery_size: must be >= 0"),
    ],
)
def test_bad_params_name_the_key(change, key):
    with pytest.raises(ParamsError, match=key):
        parse(Config, "dataset.shapes", {**SMALL, **change})


def test_missing_param_names_the_key():
    raw = {k: v for k, v in SMALL.items() if k != "novel_combos"}
    with pytest.raises(ParamsError, match=r"dataset\.shapes\.novel_combos: Field required"):
        parse(Config, "dataset.shapes", raw)


def test_config_is_the_params_yaml_section():
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields == set(SMALL)


def test_a_val_split_is_drawn_last_and_leaves_the_other_splits_as_they_were():
    without = shapes.generate(small_config())
    with_val = shapes.generate(small_config(val_queries=15, val_gallery_size=40))
    kept = {i: s for i, s in with_val.split_of.items() if s != "val"}
    assert kept == without.split_of  # the same scenes in the same splits, in the same order
    assert [q for q in with_val.queries if q.split != "val"] == without.queries
    val_queries = [q for q in with_val.queries if q.split == "val"]
    assert len(val_queries) == 15 and [q.query_id for q in val_queries][:2] == ["val-000000", "val-000001"]
    val_images = {i for i, s in with_val.split_of.items() if s == "val"}
    assert len(val_images) == 40 and not val_images & set(without.split_of)
    for q in val_queries:  # drawn like test: no held-out pair is named
        assert image_id(q.reference) in val_images and image_id(q.target) in val_images
        assert all(obj is None or obj.combo not in with_val.held_out for obj in q.target)
    with pytest.raises(ValueError, match="val_queries: must be >= 0"):
        small_config(val_queries=-1)
