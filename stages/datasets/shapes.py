"""A CSS3D-like synthetic dataset: coloured shapes on a 3x3 grid, edited by one text instruction.

A scene holds min_objects..max_objects objects, at most one per grid cell; an object is a size
(small, large), a colour (8) and a shape (circle, square, triangle). A query is a reference scene,
an instruction (add, remove, change colour, change size, move one object) and the target scene.

Splits:
    train, test   no object anywhere in them uses a held-out (shape, colour) pair
    novel         the object the text names, in its target state, uses a held-out pair, so the
                  model must compose a shape and a colour it never saw together

Every scene is one image whatever query uses it (its id hashes the scene) and every image belongs
to exactly one split. Everything is drawn from one RNG seeded by `seed`: same params, same bytes.
"""
from __future__ import annotations

import hashlib
import io
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
from PIL import Image, ImageDraw
from tqdm import tqdm

from stages.atomic import write_bytes, write_json
from stages.manifest import IMAGES_SCHEMA, QUERIES_SCHEMA
from stages.params import ParamsError, require, section

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 255),
    "yellow": (245, 225, 40),
    "purple": (165, 60, 225),
    "cyan": (40, 225, 225),
    "orange": (255, 140, 0),
    "gray": (150, 150, 150),
}
SIZES = ("small", "large")
POSITIONS = (
    "top-left", "top-centre", "top-right",
    "middle-left", "centre", "middle-right",
    "bottom-left", "bottom-centre", "bottom-right",
)  # fmt: skip
CELLS = len(POSITIONS)
ALL_COMBOS = tuple((shape, colour) for shape in SHAPES for colour in COLOURS)
BACKGROUND = (18, 18, 24)
# Half the side of an object's bounding box, as a fraction of a grid cell.
HALF_EXTENT = {"small": 0.24, "large": 0.42}

SPLITS = ("train", "test", "novel")
# novel first: its queries are the hardest to draw, so they get first pick of the scenes.
GENERATION_ORDER = ("novel", "test", "train")
KINDS = ("add", "remove", "colour", "size", "move")
# A split gives up after this many draws in a row that produced no new query.
MAX_FAILED_DRAWS = 20_000


@section
class Config:
    seed: int
    image_size: int
    min_objects: int
    max_objects: int
    train_queries: int
    test_queries: int
    novel_queries: int
    novel_combos: int

    def __post_init__(self) -> None:
        require(self.image_size >= 16, "image_size", f"must be at least 16 pixels, got {self.image_size}")
        require(1 <= self.min_objects <= CELLS, "min_objects", f"must be in 1..{CELLS}, got {self.min_objects}")
        require(
            self.min_objects <= self.max_objects <= CELLS,
            "max_objects",
            f"must be in min_objects..{CELLS} ({self.min_objects}..{CELLS}), got {self.max_objects}",
        )
        for split in SPLITS:
            count = self.query_count(split)
            require(count > 0, f"{split}_queries", f"must be > 0, got {count}")
        require(
            0 < self.novel_combos < len(ALL_COMBOS),
            "novel_combos",
            f"must be in 1..{len(ALL_COMBOS) - 1} (there are {len(ALL_COMBOS)} shape-colour pairs), "
            f"got {self.novel_combos}",
        )

    def query_count(self, split: str) -> int:
        return getattr(self, f"{split}_queries")


class Obj(NamedTuple):
    size: str
    colour: str
    shape: str

    @property
    def combo(self) -> tuple[str, str]:
        return (self.shape, self.colour)

    def __str__(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


# One entry per grid cell, row-major, None where the cell is empty.
Scene = tuple[Obj | None, ...]


@dataclass(frozen=True)
class Query:
    query_id: str
    split: str
    kind: str  # one of KINDS
    reference: Scene
    text: str
    target: Scene
    # The object the text names, in its target state (for `remove`, as it was before removal).
    named: Obj


@dataclass(frozen=True)
class ShapesData:
    held_out: tuple[tuple[str, str], ...]  # (shape, colour) pairs seen only in `novel`
    scenes: dict[str, Scene]  # image_id -> scene, in order of split then first use
    split_of: dict[str, str]  # image_id -> split
    queries: list[Query]  # in split order, numbered within each split


# ---------------------------------------------------------------- scenes, ids, captions


def scene_key(scene: Scene) -> str:
    """Canonical text of a scene: its objects sorted by cell."""
    return ";".join(f"{cell}:{obj}" for cell, obj in enumerate(scene) if obj is not None)


def image_id(scene: Scene) -> str:
    return "shapes-" + hashlib.sha1(scene_key(scene).encode()).hexdigest()[:16]


def caption(scene: Scene) -> str:
    """E.g. 'a large red circle at top-left, a small blue square at centre' (objects in grid order)."""
    return ", ".join(f"a {obj} at {POSITIONS[cell]}" for cell, obj in enumerate(scene) if obj is not None)


_OBJECT = rf"(?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})"
_CAPTION_ITEM = re.compile(rf"a {_OBJECT} at (?P<position>{'|'.join(POSITIONS)})")


def parse_caption(text: str) -> Scene:
    """The scene a `caption` describes; raises ValueError on any other text."""
    cells: list[Obj | None] = [None] * CELLS
    for item in text.split(", "):
        match = _CAPTION_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"not a shapes caption item: {item!r}")
        cell = POSITIONS.index(match["position"])
        if cells[cell] is not None:
            raise ValueError(f"two objects at {match['position']} in {text!r}")
        cells[cell] = Obj(match["size"], match["colour"], match["shape"])
    return tuple(cells)


# ---------------------------------------------------------------- query generation


def _object_counts(kind: str, cfg: Config) -> range:
    """Possible object counts of the reference scene, so both scenes stay within min..max objects."""
    lo, hi = cfg.min_objects, cfg.max_objects
    if kind == "add":
        return range(lo, hi)
    if kind == "remove":
        return range(lo + 1, hi + 1)
    if kind == "move":  # needs an empty cell to move to
        return range(lo, min(hi, CELLS - 1) + 1)
    return range(lo, hi + 1)


def feasible_kinds(cfg: Config) -> tuple[str, ...]:
    """Kinds of modification the object bounds allow (e.g. no add/remove when min == max)."""
    return tuple(kind for kind in KINDS if len(_object_counts(kind, cfg)) > 0)


def _random_object(rng: random.Random, combos: list[tuple[str, str]]) -> Obj:
    shape, colour = rng.choice(combos)
    return Obj(rng.choice(SIZES), colour, shape)


def _draw_query(
    rng: random.Random,
    kind: str,
    n_objects: int,
    background: list[tuple[str, str]],
    named_combos: list[tuple[str, str]],
) -> tuple[Scene, str, Scene, Obj] | None:
    """One random (reference, text, target, named object); None if this draw cannot be completed.

    The objects the text does not name use `background` combos; the named object, in its target
    state, uses `named_combos`.
    """
    cells = rng.sample(range(CELLS), n_objects)
    if kind == "add":
        others = {cell: _random_object(rng, background) for cell in cells}
        free_cell = _free_cell(rng, cells)
        added = _random_object(rng, named_combos)
        return _scene(others), f"add a {added} at {POSITIONS[free_cell]}", _scene(others, {free_cell: added}), added

    named_cell = cells[0]
    others = {cell: _random_object(rng, background) for cell in cells[1:]}
    where = POSITIONS[named_cell]
    if kind == "colour":
        after = _random_object(rng, named_combos)
        old_colours = [c for c in COLOURS if c != after.colour and (after.shape, c) in background]
        if not old_colours:
            return None
        before = after._replace(colour=rng.choice(old_colours))
        text = f"make the {before} at {where} {after.colour}"
        return _scene(others, {named_cell: before}), text, _scene(others, {named_cell: after}), after

    obj = _random_object(rng, named_combos)
    reference = _scene(others, {named_cell: obj})
    if kind == "remove":
        return reference, f"remove the {obj} at {where}", _scene(others), obj
    if kind == "size":
        resized = obj._replace(size="large" if obj.size == "small" else "small")
        return reference, f"make the {obj} at {where} {resized.size}", _scene(others, {named_cell: resized}), resized
    if kind == "move":
        free_cell = _free_cell(rng, cells)
        text = f"move the {obj} from {where} to {POSITIONS[free_cell]}"
        return reference, text, _scene(others, {free_cell: obj}), obj
    raise ValueError(f"unknown modification kind {kind!r}")


def _free_cell(rng: random.Random, occupied: list[int]) -> int:
    return rng.choice([cell for cell in range(CELLS) if cell not in occupied])


def _scene(*placements: dict[int, Obj]) -> Scene:
    cells: list[Obj | None] = [None] * CELLS
    for placement in placements:
        for cell, obj in placement.items():
            cells[cell] = obj
    return tuple(cells)


def _generate_split(
    rng: random.Random,
    cfg: Config,
    split: str,
    allowed: list[tuple[str, str]],
    held_out: list[tuple[str, str]],
    split_of: dict[str, str],
    scenes: dict[str, Scene],
) -> list[Query]:
    """Draw the split's queries; registers their scenes in `split_of` and `scenes`."""
    count = cfg.query_count(split)
    named_combos = held_out if split == "novel" else allowed
    kinds = feasible_kinds(cfg)
    seen: set[tuple[str, str]] = set()
    queries: list[Query] = []
    failed = 0
    while len(queries) < count:
        if failed >= MAX_FAILED_DRAWS:
            raise ParamsError(
                f"dataset.shapes.{split}_queries: could draw only {len(queries)} of {count} distinct "
                f"{split} queries ({failed} draws in a row failed); lower the count, widen "
                f"min_objects..max_objects or hold out fewer novel_combos"
            )
        kind = rng.choice(kinds)
        drawn = _draw_query(rng, kind, rng.choice(_object_counts(kind, cfg)), allowed, named_combos)
        if drawn is None:
            failed += 1
            continue
        reference, text, target, named = drawn
        ref_id, target_id = image_id(reference), image_id(target)
        if (ref_id, text) in seen or any(split_of.get(i, split) != split for i in (ref_id, target_id)):
            failed += 1
            continue
        failed = 0
        seen.add((ref_id, text))
        for scene_id, scene in ((ref_id, reference), (target_id, target)):
            split_of[scene_id] = split
            scenes[scene_id] = scene
        queries.append(Query(f"{split}-{len(queries):06d}", split, kind, reference, text, target, named))
    return queries


def generate(cfg: Config) -> ShapesData:
    """All scenes and queries of the dataset, without rendering anything."""
    rng = random.Random(cfg.seed)
    held_out = sorted(rng.sample(ALL_COMBOS, cfg.novel_combos))
    allowed = [combo for combo in ALL_COMBOS if combo not in held_out]
    split_of: dict[str, str] = {}
    scenes: dict[str, Scene] = {}
    by_split = {
        split: _generate_split(rng, cfg, split, allowed, held_out, split_of, scenes) for split in GENERATION_ORDER
    }
    ordered_ids = sorted(scenes, key=lambda i: SPLITS.index(split_of[i]))  # stable: first use within a split
    return ShapesData(
        held_out=tuple(held_out),
        scenes={i: scenes[i] for i in ordered_ids},
        split_of={i: split_of[i] for i in ordered_ids},
        queries=[q for split in SPLITS for q in by_split[split]],
    )


# ---------------------------------------------------------------- rendering and output


def render(scene: Scene, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell_side = image_size / 3
    for cell, obj in enumerate(scene):
        if obj is None:
            continue
        cx, cy = (cell % 3 + 0.5) * cell_side, (cell // 3 + 0.5) * cell_side
        half = HALF_EXTENT[obj.size] * cell_side
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_path(scene_id: str) -> str:
    return f"images/{scene_id}.png"


def tables(data: ShapesData) -> tuple[pa.Table, pa.Table]:
    """The (images, queries) manifests of `data`."""
    images = pa.Table.from_pylist(
        [
            {"image_id": i, "path": image_path(i), "split": data.split_of[i], "caption": caption(scene)}
            for i, scene in data.scenes.items()
        ],
        schema=IMAGES_SCHEMA,
    )
    queries = pa.Table.from_pylist(
        [
            {
                "query_id": q.query_id,
                "split": q.split,
                "reference_id": image_id(q.reference),
                "text": q.text,
                "target_id": image_id(q.target),
            }
            for q in data.queries
        ],
        schema=QUERIES_SCHEMA,
    )
    return images, queries


def summary(data: ShapesData) -> dict:
    """What shapes.json records: the held-out pairs and the counts."""
    images = Counter(data.split_of.values())
    queries = Counter(q.split for q in data.queries)
    return {
        "held_out_combos": [list(combo) for combo in data.held_out],
        "images": {split: images[split] for split in SPLITS},
        "queries": {split: queries[split] for split in SPLITS},
        "queries_by_kind": dict(sorted(Counter(q.kind for q in data.queries).items())),
    }


def build(cfg: Config, out_dir: Path) -> tuple[pa.Table, pa.Table]:
    """Render every scene once to `out_dir/images/`, write `out_dir/shapes.json`, return the manifests."""
    out_dir = Path(out_dir)
    data = generate(cfg)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for scene_id, scene in tqdm(data.scenes.items(), desc="render shapes", unit="img", disable=None):
        write_bytes(out_dir / image_path(scene_id), png_bytes(render(scene, cfg.image_size)))
    write_json(out_dir / "shapes.json", summary(data))
    return tables(data)
