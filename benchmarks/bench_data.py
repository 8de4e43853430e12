"""Throughput of the data stages on synthetic images: resize (1 worker vs all cores) and shard.

    python benchmarks/bench_data.py [--images N] [--size S]

Everything is written to a temporary directory that is removed at the end. Each measured step is
one `bench_*` function returning a Measurement; the table at the end lists them all.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw

from stages import manifest
from stages.params import parse
from stages.resize import ResizeConfig, run_resize
from stages.shard import ShardConfig, run_shard

SOURCE_SIZE = 80  # the side of the synthetic images, like the shapes dataset's renders


@dataclass(frozen=True)
class Measurement:
    step: str
    items: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds


def synthetic_png(rng: random.Random) -> bytes:
    """A few coloured boxes and ellipses on a plain background: compresses like real renders."""
    img = Image.new("RGB", (SOURCE_SIZE, SOURCE_SIZE), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):
        x, y = rng.randrange(SOURCE_SIZE - 20), rng.randrange(SOURCE_SIZE - 20)
        box = (x, y, x + rng.randint(8, 20), y + rng.randint(8, 20))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def make_dataset(root: Path, count: int, seed: int = 0) -> Path:
    """`count` train images and as many queries (image i -> image i+1), written as a prepared dataset."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    images = []
    for n in range(count):
        path = f"images/{n:06d}.png"
        (root / path).write_bytes(synthetic_png(rng))
        images.append({"image_id": f"img{n:06d}", "path": path, "split": "train", "caption": f"scene {n}"})
    queries = [
        {"query_id": f"q{n:06d}", "split": "train", "reference_id": images[n]["image_id"],
         "text": "add a red box", "target_id": images[(n + 1) % count]["image_id"]}
        for n in range(count)
    ]
    manifest.write(root, pa.Table.from_pylist(images, schema=manifest.IMAGES_SCHEMA),
                   pa.Table.from_pylist(queries, schema=manifest.QUERIES_SCHEMA))
    return root


def bench_resize(prepared: Path, output: Path, size: int, workers: int) -> Measurement:
    cfg = parse(ResizeConfig, "resize", dict(size=size, mode="center_crop", pad_value=0, format="png",
                                             jpeg_quality=90, workers=workers))
    start = time.perf_counter()
    summary = run_resize(prepared, output, cfg)
    seconds = time.perf_counter() - start
    return Measurement(f"resize, {workers} worker{'s' if workers > 1 else ''}", summary.images_out, seconds)


def bench_shard(resized: Path, output: Path) -> Measurement:
    cfg = parse(ShardConfig, "shard", dict(maxcount=2000, maxsize=200_000_000))
    start = time.perf_counter()
    summary = run_shard(resized, output, cfg)
    seconds = time.perf_counter() - start
    samples = sum(kinds[kind]["count"] for kinds in summary.splits.values() for kind in ("gallery", "queries"))
    return Measurement("shard (gallery + queries samples)", samples, seconds)


def print_table(rows: list[Measurement]) -> None:
    width = max(len(row.step) for row in rows)
    print(f"{'step':<{width}}  {'items':>7}  {'seconds':>8}  {'items/s':>9}")
    for row in rows:
        print(f"{row.step:<{width}}  {row.items:>7}  {row.seconds:>8.2f}  {row.rate:>9.0f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="synthetic images to generate")
    parser.add_argument("--size", type=int, default=64, help="resize.size")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        tmp = Path(tmp)
        prepared = make_dataset(tmp / "prepared", args.images)
        one = bench_resize(prepared, tmp / "resized-1", args.size, workers=1)
        all_cores = bench_resize(prepared, tmp / "resized-all", args.size, workers=cores)
        sharded = bench_shard(tmp / "resized-all", tmp / "shards")
    print()
    print_table([one, all_cores, sharded])
    print(f"resize speed-up with {cores} workers: {all_cores.rate / one.rate:.2f}x")


if __name__ == "__main__":
    main()
