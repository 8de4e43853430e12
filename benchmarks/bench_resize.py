"""Resize throughput on photo-like JPEGs: the `resize` stage against a typical research resize script.

    python benchmarks/bench_resize.py [--images 500] [--size 64] [--format png]

Run from the repository root. Generates --images 1024x768 JPEGs (quality 90: smooth colour gradients,
random filled shapes, sensor noise) in a temporary directory, as a prepared dataset (images/ +
images.parquet + queries.parquet), with a process pool and untimed. Then times, one after the other:

    baseline    one process: Image.open(p).convert("RGB"), shorter side to --size (bicubic), centre
                crop, save: every image decoded at full size, as the datasets' own resize scripts do
    stage, 1    stages.resize.run_resize with workers=1: JPEG decoded at a reduced scale (Image.draft)
    stage, all  the same with workers=0 (all cores): draft and the process pool

Both write --format files with mode center_crop; the table ends with the mean absolute difference of the
stage's images from the baseline's (grey levels), and the speed-ups stage/baseline. The directory is
removed at the end.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from stages.datasets import manifest
from stages.common.params import parse
from stages.common.parallel import ParallelConfig, plan
from stages.resize import EXTENSIONS, ResizeConfig, run_resize
from measure import Measurement, print_table  # benchmarks/measure.py (scripts run from benchmarks/)

WIDTH, HEIGHT = 1024, 768


def rate(self) -> float:
        return self.items / self.seconds


def photo(seed: int) -> Image.Image:
    """Photo-like content: smooth colour gradients, random filled shapes with sharp edges, sensor noise."""
    rng = np.random.default_rng(seed)
    # smooth gradients: a random 4x3 grid of colours, upscaled
    img = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(20, 60))):
        left, top = int(rng.integers(-100, WIDTH)), int(rng.integers(-100, HEIGHT))
        box = (left, top, left + int(rng.integers(10, WIDTH // 3)), top + int(rng.integers(10, HEIGHT // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (HEIGHT, WIDTH, 3), dtype=np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def write_photo(path: Path, seed: int) -> None:
    photo(seed).save(path, "JPEG", quality=90)


def make_dataset(root: Path, count: int) -> list[Path]:
    """A prepared dataset of `count` JPEGs (split train, one query per consecutive pair); their paths."""
    (root / "images").mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(count)]
    paths = [root / "images" / f"{image_id}.jpg" for image_id in ids]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write_photo, paths, range(count), chunksize=16))
    images = [{"image_id": i, "path": f"images/{i}.jpg", "split": "train", "caption": ""} for i in ids]
    queries = [{"query_id": f"q{n}", "split": "train", "reference_id": ref, "text": "make it brighter",
                "target_id": tgt} for n, (ref, tgt) in enumerate(zip(ids, ids[1:]))]
    manifest.write(root, pa.Table.from_pylist(images, schema=manifest.IMAGES_SCHEMA),
                   pa.Table.from_pylist(queries, schema=manifest.QUERIES_SCHEMA))
    return paths


def baseline_resize(path: Path, target: Path, size: int, fmt: str) -> None:
    """What a dataset's own resize script does: full decode, shorter side to `size`, centre crop, save."""
    img = Image.open(path).convert("RGB")
    width, height = img.size
    scale = size / min(width, height)
    img = img.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    img.save(target, "JPEG", quality=90) if fmt == "jpeg" else img.save(target, "PNG")


def bench_baseline(paths: list[Path], output: Path, size: int, fmt: str) -> Measurement:
    output.mkdir()
    start = time.perf_counter()
    for path in paths:
        baseline_resize(path, output / path.with_suffix(EXTENSIONS[fmt]).name, size, fmt)
    return Measurement("baseline: loop, full decode", len(paths), time.perf_counter() - start)


def bench_stage(prepared: Path, output: Path, size: int, fmt: str, workers: int) -> Measurement:
    cfg = parse(ResizeConfig, "resize", dict(size=size, mode="center_crop", pad_value=0, format=fmt, jpeg_quality=90))
    parallel = ParallelConfig(runner="processes", workers=workers, address=None, items_per_task=1000)
    start = time.perf_counter()
    summary = run_resize(prepared, output, cfg, parallel)
    seconds = time.perf_counter() - start
    if summary.corrupt:
        raise AssertionError(f"the stage found {summary.corrupt} corrupt images among the generated ones")
    used = plan(parallel, summary.images_in)[0]
    return Measurement(f"stage: draft, {used} worker{'s' if used > 1 else ''}", summary.images_out, seconds)


def mean_difference(a: Path, b: Path, names: list[str]) -> float:
    """Mean absolute pixel difference (grey levels) between the images named `names` in a and b."""
    total = 0.0
    for name in names:
        with Image.open(a / name) as x, Image.open(b / name) as y:
            total += float(np.abs(np.asarray(x, dtype=np.float32) - np.asarray(y, dtype=np.float32)).mean())
    return total / len(names)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="how many 1024x768 JPEGs")
    parser.add_argument("--size", type=int, default=64, help="resize.size (params.yaml: 64; real datasets: 224)")
    parser.add_argument("--format", choices=sorted(EXTENSIONS), default="png", help="resize.format of the output")
    args = parser.parse_args(argv)
    cores = plan(ParallelConfig(runner="processes", workers=0, address=None, items_per_task=1000), args.images)[0]
    with tempfile.TemporaryDirectory(prefix="bench_resize-") as tmp:
        tmp = Path(tmp)
        began = time.perf_counter()
        paths = make_dataset(tmp / "prepared", args.images)
        print(f"generated {len(paths)} {WIDTH}x{HEIGHT} JPEGs in {time.perf_counter() - began:.1f} s (not timed)")
        baseline = bench_baseline(paths, tmp / "baseline", args.size, args.format)
        one = bench_stage(tmp / "prepared", tmp / "stage-1", args.size, args.format, workers=1)
        every = bench_stage(tmp / "prepared", tmp / "stage-all", args.size, args.format, workers=0)
        sample = [p.with_suffix(EXTENSIONS[args.format]).name for p in paths[:: max(1, len(paths) // 50)]]
        difference = mean_difference(tmp / "baseline", tmp / "stage-all" / "images", sample)
    print()
    print(f"{WIDTH}x{HEIGHT} JPEG -> {args.size}x{args.size} {args.format}, center_crop; "
          f"{cores} cores (os.cpu_count), {len(os.sched_getaffinity(0))} usable by this process")
    print_table([baseline, one, every], unit="images")
    print(f"stage, 1 worker / baseline (draft alone): {one.rate / baseline.rate:.2f}x")
    print(f"stage, {cores} workers / baseline (draft + pool): {every.rate / baseline.rate:.2f}x")
    print(f"mean |stage - baseline| over {len(sample)} images: {difference:.2f} grey levels")


if __name__ == "__main__":
    main()
