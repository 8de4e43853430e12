"""A CSS3D-like synthetic dataset: coloured shapes on a 3x3 grid, edited by one text instruction.

A scene holds min_objects..max_objects objects, at most one per grid cell; an object is a size
(small, large), a colour (8) and a shape (circle, square, triangle). A query is a reference scene,
an instruction (add, remove, change colour, change size, move one object) and the target scene.

Splits:
    train, test   no object anywhere in them uses a held-out (shape, colour) pair
    novel         the object the text names, in its target state, uses a held-out pair, so the
                  model must compose a shape and a colour it never saw together
    val           (with val_queries > 0) drawn as test, after everything else, for validation during training:
                  its gallery topped up with distractors to val_gallery_size; the other splits do not depend on it

Every scene is one image whatever query uses it (its id hashes the scene) and every image belongs
to exactly one split. With `eval_gallery_size` the test and novel galleries are topped up to that many images with
distractor scenes, drawn after every query (the queries stay the same): near misses of a target, the target with
the object its text names in another size, colour, shape or cell (once those are taken, one more edit of one),
so only the text tells most of them apart and recall@10 and @50 do not saturate. Everything is drawn from one RNG seeded by `seed`: same params, same bytes.
The scenes are drawn here, then rendered in parallel as the `parallel` params say (stages.common.parallel):
the same bytes whatever the workers.
"""
from __future__ import annotations

import hashlib
import io
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
from PIL import Image, ImageDraw

from stages.common.atomic import write_bytes, write_json
from stages.datasets.manifest import IMAGES_SCHEMA, QUERIES_SCHEMA
from stages.common.parallel import SERIAL, ParallelConfig, map_items
from stages.common.params import ParamsError, require, section
from stages.datasets.evaluation import Evaluation

EVALUATION = Evaluation(splits=("test", "novel"), protocols=("target",), ks=(1, 5, 10, 50), whm_definition="splits",
                        validation="val")

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

SPLITS = ("train", "test", "novel", "val")
REQUIRED_SPLITS = ("train", "test", "novel")  # val is optional (val_queries 0: none)
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
    queries_per_reference: int
    eval_gallery_size: int = 0  # test and novel galleries topped up with distractors to this many images; 0 = none
    val_queries: int = 0        # the validation split's queries; 0 = no val split
    val_gallery_size: int = 0   # its gallery topped up with distractors to this many images; 0 = none

    def __post_init__(self) -> None:
        require(self.image_size >= 16, "image_size", f"must be at least 16 pixels, got {self.image_size}")
        require(1 <= self.min_objects <= CELLS, "min_objects", f"must be in 1..{CELLS}, got {self.min_objects}")
        require(
            self.min_objects <= self.max_objects <= CELLS,
            "max_objects",
            f"must be in min_objects..{CELLS} ({self.min_objects}..{CELLS}), got {self.max_objects}",
        )
        require(self.eval_gallery_size >= 0, "eval_gallery_size", f"must be >= 0, got {self.eval_gallery_size}")
        require(self.val_queries >= 0, "val_queries", f"must be >= 0, got {self.val_queries}")
        require(self.val_gallery_size >= 0, "val_gallery_size", f"must be >= 0, got {self.val_gallery_size}")
        require(self.queries_per_reference > 0, "queries_per_reference",
                f"must be > 0, got {self.queries_per_reference}")
        for split in REQUIRED_SPLITS:
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


Edit = tuple[str, str, Scene, Obj]  # (kind, text, target scene, named object in its target state)


def _random_object(rng: random.Random, combos: list[tuple[str, str]]) -> Obj:
    shape, colour = rng.choice(combos)
    return Obj(rng.choice(SIZES), colour, shape)


def _with(scene: Scene, cell: int, obj: Obj | None) -> Scene:
    return scene[:cell] + (obj,) + scene[cell + 1 :]


def _random_reference(
    rng: random.Random, cfg: Config, background: list[tuple[str, str]], named_combos: list[tuple[str, str]]
) -> Scene:
    """min..max objects of `background` combos; for `novel` (named combos not in the background),
    one object may use a named combo too, so it can be removed, resized or moved."""
    cells = rng.sample(range(CELLS), rng.randint(cfg.min_objects, cfg.max_objects))
    scene: Scene = (None,) * CELLS
    for cell in cells:
        scene = _with(scene, cell, _random_object(rng, background))
    if named_combos[0] not in background and rng.random() < 0.5:
        scene = _with(scene, cells[0], _random_object(rng, named_combos))
    return scene


def edits(scene: Scene, cfg: Config, named_combos: list[tuple[str, str]]) -> dict[str, list[Edit]]:
    """Every single-object edit of `scene` whose named object (in its target state) uses `named_combos`
    and that keeps the object count within min_objects..max_objects, by kind."""
    occupied = [cell for cell in range(CELLS) if scene[cell] is not None]
    free = [cell for cell in range(CELLS) if scene[cell] is None]
    named = set(named_combos)
    by_kind: dict[str, list[Edit]] = {kind: [] for kind in KINDS}
    if len(occupied) < cfg.max_objects:
        for cell in free:
            for shape, colour in named_combos:
                for size in SIZES:
                    obj = Obj(size, colour, shape)
                    by_kind["add"].append(("add", f"add a {obj} at {POSITIONS[cell]}", _with(scene, cell, obj), obj))
    for cell in occupied:
        obj, where = scene[cell], POSITIONS[cell]
        for colour in COLOURS:
            if colour != obj.colour and (obj.shape, colour) in named:
                after = obj._replace(colour=colour)
                by_kind["colour"].append(("colour", f"make the {obj} at {where} {colour}", _with(scene, cell, after), after))
        if obj.combo not in named:
            continue
        if len(occupied) > cfg.min_objects:
            by_kind["remove"].append(("remove", f"remove the {obj} at {where}", _with(scene, cell, None), obj))
        resized = obj._replace(size="large" if obj.size == "small" else "small")
        by_kind["size"].append(("size", f"make the {obj} at {where} {resized.size}", _with(scene, cell, resized), resized))
        for to in free:
            moved = _with(_with(scene, cell, None), to, obj)
            by_kind["move"].append(("move", f"move the {obj} from {where} to {POSITIONS[to]}", moved, obj))
    return {kind: options for kind, options in by_kind.items() if options}


def feasible_kinds(cfg: Config) -> tuple[str, ...]:
    """Kinds of modification the object bounds allow (e.g. no add/remove when min == max)."""
    kinds = {"colour", "size"}
    if cfg.min_objects < cfg.max_objects:
        kinds |= {"add", "remove"}
    if cfg.min_objects < CELLS:
        kinds.add("move")
    return tuple(kind for kind in KINDS if kind in kinds)


def _generate_split(
    rng: random.Random,
    cfg: Config,
    split: str,
    allowed: list[tuple[str, str]],
    held_out: list[tuple[str, str]],
    split_of: dict[str, str],
    scenes: dict[str, Scene],
) -> list[Query]:
    """Draw the split's queries, `queries_per_reference` edits of each reference scene (as CSS3D
    does), so every gallery holds several targets one edit away from each reference: the text,
    not the reference image alone, decides which of them is right. Registers the scenes used."""
    count = cfg.query_count(split)
    named_combos = held_out if split == "novel" else allowed
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
        reference = _random_reference(rng, cfg, allowed, named_combos)
        ref_id = image_id(reference)
        options = edits(reference, cfg, named_combos)
        if split_of.get(ref_id, split) != split or not options:
            failed += 1
            continue
        added = 0
        for _ in range(cfg.queries_per_reference):
            kind, text, target, named = rng.choice(options[rng.choice(sorted(options))])
            target_id = image_id(target)
            if (ref_id, text) in seen or split_of.get(target_id, split) != split or len(queries) == count:
                continue
            seen.add((ref_id, text))
            for scene_id, scene in ((ref_id, reference), (target_id, target)):
                split_of[scene_id] = split
                scenes[scene_id] = scene
            queries.append(Query(f"{split}-{len(queries):06d}", split, kind, reference, text, target, named))
            added += 1
        failed = 0 if added else failed + 1
    return queries


def near_misses(query: Query, cfg: Config, named_combos: list[tuple[str, str]]) -> list[Scene]:
    """Scenes that differ from the query's target only in the object its text names: another size, colour or
    shape (from the split's named combos) or another cell. Only the text tells them from the target. A `remove`
    target has no named object left: its one-edit neighbours instead."""
    target = query.target
    cells = [cell for cell, obj in enumerate(target) if obj == query.named]
    if query.kind == "remove" or not cells:
        return [edit[2] for options in edits(target, cfg, named_combos).values() for edit in options]
    cell, obj = cells[0], target[cells[0]]
    variants = [_with(target, cell, Obj(size, colour, shape)) for shape, colour in named_combos for size in SIZES
                if Obj(size, colour, shape) != obj]
    free = [c for c in range(CELLS) if target[c] is None]
    return variants + [_with(_with(target, cell, None), to, obj) for to in free]


def _add_distractors(rng: random.Random, cfg: Config, split: str, allowed: list[tuple[str, str]],
                     held_out: list[tuple[str, str]], queries: list[Query], split_of: dict[str, str],
                     scenes: dict[str, Scene]) -> int:
    """Register distractor scenes in `split` until its gallery holds cfg.eval_gallery_size images (val:
    cfg.val_gallery_size); returns how many were added. A distractor is never a scene of any split already (so no
    query's answer changes)."""
    named_combos = held_out if split == "novel" else allowed
    have = sum(1 for s in split_of.values() if s == split)
    size_key = "val_gallery_size" if split == "val" else "eval_gallery_size"
    gallery_size = getattr(cfg, size_key)
    added = failed = 0
    while have + added < gallery_size:
        if failed >= MAX_FAILED_DRAWS:
            raise ParamsError(f"dataset.shapes.{size_key}: could find only {have + added} distinct {split} "
                              f"scenes ({failed} draws in a row failed); lower it or widen min_objects..max_objects")
        options = near_misses(rng.choice(queries), cfg, named_combos)
        scene = rng.choice(options) if options else None
        if scene is not None and image_id(scene) in split_of:  # taken: one more edit of it, a near miss further out
            further = edits(scene, cfg, named_combos)
            scene = rng.choice(further[rng.choice(sorted(further))])[2] if further else None
        scene_id = None if scene is None else image_id(scene)
        if scene_id is None or scene_id in split_of:
            failed += 1
            continue
        split_of[scene_id], scenes[scene_id] = split, scene
        added, failed = added + 1, 0
    return added


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
    for split in ("test", "novel"):  # after every query is drawn, so the queries do not depend on it
        _add_distractors(rng, cfg, split, allowed, held_out, by_split[split], split_of, scenes)
    by_split["val"] = []
    if cfg.val_queries:  # last: the other splits are the same with and without it
        by_split["val"] = _generate_split(rng, cfg, "val", allowed, held_out, split_of, scenes)
        _add_distractors(rng, cfg, "val", allowed, held_out, by_split["val"], split_of, scenes)
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
        "images": {split: images[split] for split in SPLITS if split in REQUIRED_SPLITS or images[split]},
        "queries": {split: queries[split] for split in SPLITS if split in REQUIRED_SPLITS or queries[split]},
        "queries_by_kind": dict(sorted(Counter(q.kind for q in data.queries).items())),
    }


def write_scene(item: tuple[str, Scene], out_dir: Path, image_size: int) -> None:
    """Render one (scene_id, scene) to its png under `out_dir` (atomically)."""
    scene_id, scene = item
    write_bytes(out_dir / image_path(scene_id), png_bytes(render(scene, image_size)))


def build(cfg: Config, out_dir: Path, download: object = None,
          parallel: ParallelConfig = SERIAL) -> tuple[pa.Table, pa.Table]:
    """Render every scene once to `out_dir/images/` (in parallel as `parallel` says), write
    `out_dir/shapes.json`, return the manifests.

    `download` (the `download` params) is unused: shapes is generated, nothing is fetched."""
    out_dir = Path(out_dir)
    data = generate(cfg)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    render_one = partial(write_scene, out_dir=out_dir.absolute(), image_size=cfg.image_size)  # workers need no cwd
    map_items(render_one, list(data.scenes.items()), parallel, "render shapes", label=itemgetter(0), unit="img")
    write_json(out_dir / "shapes.json", summary(data))
    return tables(data)
