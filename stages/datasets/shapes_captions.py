"""A COCO-shaped image-text matching set from the shapes scenes: 5 partial captions per image, Karpathy-style splits.

Scenes are the `shapes` generator's (coloured shapes on a 3x3 grid, stages.datasets.shapes), drawn at random, each
image once. A caption names a random subset of its scene's objects (`max_named` at most) in varied wording: several
templates (a list, a spatial relation between two objects, an object count, a position), synonyms of sizes, colours,
shapes and positions, the named objects in random order, the size sometimes left out. Like a COCO caption, it fits
many images; an image's five captions together pin it down much better, so t2i (one caption -> its image) is harder
than i2t (an image -> the best of its five captions), as on COCO.

Splits, as Karpathy's: train, val (checkpoint selection), test (cut into `folds` consecutive folds of equal size
for the COCO 1K x 5 protocol; the whole split is the 5K-style protocol) and novel: scenes with at least one object
of a (shape, colour) pair held out of every other split.

Outputs, as the COCO adapter's (stages.datasets.coco): images/<image_id>.png, images.parquet (caption = the first
caption), an empty queries.parquet, captions.parquet (caption_id = <image_id>-<k>), folds.json and shapes_captions.json
(counts, held-out pairs). Everything is drawn from one RNG seeded by `seed`: same params, same bytes.
"""
from __future__ import annotations

import random
from collections import Counter
from functools import partial
from operator import itemgetter
from pathlib import Path

import pyarrow as pa

from stages.common.atomic import write_json
from stages.common.parallel import SERIAL, ParallelConfig, map_items
from stages.common.params import ParamsError, require, section
from stages.datasets import captions as captions_manifest
from stages.datasets.captions import FOLDS_FILE
from stages.datasets.karpathy import empty_queries
from stages.datasets.manifest import IMAGES_SCHEMA
from stages.datasets.shapes import ALL_COMBOS, CELLS, SIZES, Obj, Scene, image_id, image_path, write_scene
from stages.datasets.evaluation import Evaluation

EVALUATION = Evaluation(splits=("test", "novel"), validation="val")  # image-text matching: evaluate.matching_ks

SPLITS = ("train", "val", "test", "novel")
MAX_FAILED_DRAWS = 20_000

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COLOUR_WORDS = {
    "red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",), "purple": ("purple", "violet"),
    "cyan": ("cyan", "turquoise"), "orange": ("orange",), "gray": ("gray", "grey"),
}
SHAPE_WORDS = {"circle": ("circle", "disc", "round shape"), "square": ("square", "box", "block"),
               "triangle": ("triangle", "wedge")}
# Row and column words of the 3x3 grid; a cell is named "<row> <column>", the centre and edges their own way.
ROW_WORDS = (("top", "upper"), ("middle",), ("bottom", "lower"))
COLUMN_WORDS = (("left",), ("centre", "center", "middle"), ("right",))
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


@section
class Config:
    seed: int = 0
    image_size: int = 80
    min_objects: int = 2
    max_objects: int = 5
    train_images: int = 10_000
    val_images: int = 1_000
    test_images: int = 5_000
    novel_images: int = 1_000
    novel_combos: int = 4        # (shape, colour) pairs seen only in `novel`
    captions_per_image: int = 5
    max_named: int = 3           # objects a caption names at most
    folds: int = 5               # test cut into this many folds (COCO 1K x 5); 0 = no folds.json

    def __post_init__(self) -> None:
        require(self.image_size >= 16, "image_size", f"must be at least 16 pixels, got {self.image_size}")
        require(1 <= self.min_objects <= self.max_objects <= CELLS, "max_objects",
                f"need 1 <= min_objects <= max_objects <= {CELLS}, got {self.min_objects}..{self.max_objects}")
        for split in SPLITS:
            require(self.image_count(split) > 0, f"{split}_images", f"must be > 0, got {self.image_count(split)}")
        require(0 < self.novel_combos < len(ALL_COMBOS), "novel_combos",
                f"must be in 1..{len(ALL_COMBOS) - 1}, got {self.novel_combos}")
        require(self.captions_per_image >= 1, "captions_per_image", f"must be >= 1, got {self.captions_per_image}")
        require(self.max_named >= 1, "max_named", f"must be >= 1, got {self.max_named}")
        require(self.folds >= 0, "folds", f"must be >= 0, got {self.folds}")
        require(self.folds == 0 or self.test_images >= self.folds, "folds",
                f"cannot cut {self.test_images} test images into {self.folds} folds")

    def image_count(self, split: str) -> int:
        return getattr(self, f"{split}_images")


# ---------------------------------------------------------------- scenes


def _draw_scene(rng: random.Random, cfg: Config, allowed: list, held_out: list, novel: bool) -> Scene:
    cells = rng.sample(range(CELLS), rng.randint(cfg.min_objects, cfg.max_objects))
    scene: list[Obj | None] = [None] * CELLS
    for i, cell in enumerate(cells):
        shape, colour = rng.choice(held_out if novel and i == 0 else allowed)
        scene[cell] = Obj(rng.choice(SIZES), colour, shape)
    return tuple(scene)


def generate(cfg: Config) -> tuple[list[str], dict[str, tuple[str, Scene]]]:
    """(held-out pairs, {image_id: (split, scene)} in split order) without rendering anything."""
    rng = random.Random(cfg.seed)
    held_out = sorted(rng.sample(ALL_COMBOS, cfg.novel_combos))
    allowed = [combo for combo in ALL_COMBOS if combo not in held_out]
    scenes: dict[str, tuple[str, Scene]] = {}
    for split in ("novel", "test", "val", "train"):
        have = failed = 0
        while have < cfg.image_count(split):
            if failed >= MAX_FAILED_DRAWS:
                raise ParamsError(f"dataset.shapes_captions.{split}_images: could draw only {have} distinct scenes "
                                  f"({failed} draws in a row repeated one); lower it or widen min..max_objects")
            scene = _draw_scene(rng, cfg, allowed, held_out, split == "novel")
            key = image_id(scene)
            if key in scenes:
                failed += 1
                continue
            scenes[key], have, failed = (split, scene), have + 1, 0
    order = sorted(scenes, key=lambda key: SPLITS.index(scenes[key][0]))  # stable: draw order within a split
    return [f"{shape} {colour}" for shape, colour in held_out], {key: scenes[key] for key in order}


# ---------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_words(rng: random.Random, obj: Obj) -> str:
    words = [rng.choice(COLOUR_WORDS[obj.colour]), rng.choice(SHAPE_WORDS[obj.shape])]
    if rng.random() < 0.6:
        words.insert(0, rng.choice(SIZE_WORDS[obj.size]))
    return " ".join(words)


def _position_words(rng: random.Random, cell: int) -> str:
    row, column = divmod(cell, 3)
    if row == 1 and column == 1:
        return rng.choice(("in the centre", "in the middle", "at the center"))
    if row == 1:
        return rng.choice((f"on the {COLUMN_WORDS[column][0]}", f"at the middle {COLUMN_WORDS[column][0]}"))
    if column == 1:
        side = ROW_WORDS[row][0]  # top | bottom
        return rng.choice((f"at the {side}", f"at the {side} centre", f"in the {ROW_WORDS[row][-1]} middle"))
    corner = f"{rng.choice(ROW_WORDS[row])} {COLUMN_WORDS[column][0]}"
    return rng.choice((f"in the {corner}", f"in the {corner} corner", f"at the {corner}"))


def _relation_words(rng: random.Random, a: int, b: int) -> str:
    """How cell a lies from cell b, e.g. 'to the left of', 'above', 'below and to the right of'."""
    (row_a, col_a), (row_b, col_b) = divmod(a, 3), divmod(b, 3)
    vertical = "above" if row_a < row_b else "below" if row_a > row_b else ""
    horizontal = "to the left of" if col_a < col_b else "to the right of" if col_a > col_b else ""
    if vertical and horizontal:
        return rng.choice((vertical, horizontal, f"{vertical} and {horizontal}"))
    return vertical or horizontal


def one_caption(rng: random.Random, scene: Scene, max_named: int) -> str:
    """A caption that names 1..max_named of the scene's objects, in one of several templates."""
    occupied = [cell for cell in range(CELLS) if scene[cell] is not None]
    named = rng.sample(occupied, rng.randint(1, min(max_named, len(occupied))))
    phrases = [_article(_object_words(rng, scene[cell])) for cell in named]
    kind = rng.choice(("list", "where", "count", "relation") if len(named) == 2 else ("list", "where", "count"))
    if kind == "relation":
        return f"{phrases[0]} {_relation_words(rng, named[0], named[1])} {phrases[1]}"
    if kind == "where":
        placed = [f"{phrase} {_position_words(rng, cell)}" for phrase, cell in zip(phrases, named)]
        return rng.choice(("", "there is ", "an image with ")) + _join(placed)
    listed = _join(phrases)
    if kind == "count":
        noun = rng.choice(("objects", "shapes", "things"))
        return rng.choice((f"{COUNT_WORDS[len(occupied)]} {noun}, among them {listed}",
                           f"{COUNT_WORDS[len(occupied)]} {noun} including {listed}"))
    return rng.choice(("", "a picture of ", "some shapes: ")) + listed


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scene_captions(rng: random.Random, scene: Scene, cfg: Config) -> list[str]:
    """cfg.captions_per_image distinct captions of one scene."""
    found: list[str] = []
    for _ in range(200 * cfg.captions_per_image):
        text = one_caption(rng, scene, cfg.max_named)
        if text not in found:
            found.append(text)
            if len(found) == cfg.captions_per_image:
                return found
    raise ParamsError(f"dataset.shapes_captions.captions_per_image: found only {len(found)} distinct captions "
                      f"for a scene of {sum(o is not None for o in scene)} objects; lower it or raise max_named")


# ---------------------------------------------------------------- build


def build(cfg: Config, out_dir: Path, download: object = None,
          parallel: ParallelConfig = SERIAL) -> tuple[pa.Table, pa.Table]:
    """Render every scene to `out_dir/images/`, write captions.parquet, folds.json and shapes_captions.json (see
    the module doc); returns (images, empty queries). `download` is unused: nothing is fetched."""
    out_dir = Path(out_dir)
    held_out, scenes = generate(cfg)
    rng = random.Random(f"{cfg.seed}-captions")
    caption_rows, image_rows = [], []
    for key, (split, scene) in scenes.items():
        texts = scene_captions(rng, scene, cfg)
        caption_rows += [{"caption_id": f"{key}-{k}", "image_id": key, "split": split, "text": text}
                         for k, text in enumerate(texts)]
        image_rows.append({"image_id": key, "path": image_path(key), "split": split, "caption": texts[0]})
    images = pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    render_one = partial(write_scene, out_dir=out_dir.absolute(), image_size=cfg.image_size)
    map_items(render_one, [(key, scene) for key, (_, scene) in scenes.items()], parallel, "render shapes_captions",
              label=itemgetter(0), unit="img")
    captions_manifest.write(out_dir, captions_manifest.table(caption_rows), images)
    summary = {"held_out_combos": held_out, "images": dict(Counter(s for s, _ in scenes.values())),
               "captions": dict(Counter(row["split"] for row in caption_rows))}
    if cfg.folds:
        test_ids = [key for key, (split, _) in scenes.items() if split == "test"]
        size = len(test_ids) // cfg.folds
        write_json(out_dir / FOLDS_FILE, {str(k): test_ids[k * size:(k + 1) * size] for k in range(cfg.folds)})
        summary["folds"] = {"count": cfg.folds, "images_per_fold": size, "left_over": len(test_ids) - cfg.folds * size}
    write_json(out_dir / "shapes_captions.json", summary)
    return images, empty_queries()
