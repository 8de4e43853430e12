"""Stage `resize`: every image to one square size and one format; unreadable images are reported.

    python -m stages.resize --prepared data/prepared --out data/resized

Reads the `resize` and `parallel` sections of params.yaml: images are resized in parallel as
`parallel` says (stages.common.parallel: a process pool, or Dask workers through Prefect, each writing its files). The
output directory appears only once complete:

    <out>/images/...        the resized files: same relative names as the input, new extension
    <out>/images.parquet    the input manifest without corrupt images, paths updated
    <out>/queries.parquet   the input queries without those that name a corrupt image
    <out>/report.json       counts, and every corrupt image with its path and error

A crashed run is resumed: the work directory is keyed by the params and the input manifest, and
images whose resized file is already there are not computed again.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path, PurePosixPath
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageFile
from pydantic import Field
from typing_extensions import Annotated

from stages.common.validation import check_from
from stages.datasets import captions, evaluation, manifest
from stages.common.atomic import staged_dir, write_bytes, write_json
from stages.common.errors import StageError, run_stage
from stages.common.parallel import SERIAL, ParallelConfig, map_items
from stages.common.params import PARAMS_FILE, load, section
from stages.common.cli import stage_parser

REPORT_FILE = "report.json"
EXTENSIONS = {"png": ".png", "jpeg": ".jpg"}
# What Pillow raises for a file that is missing, truncated, not an image or otherwise undecodable
# (a broken PNG chunk is a SyntaxError); anything else is a bug and stops the stage.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@section
class ResizeConfig:
    size: Annotated[int, Field(gt=0)]
    mode: Literal["center_crop", "pad"]
    pad_value: Annotated[int, Field(ge=0, le=255)]
    format: Literal["png", "jpeg"]
    jpeg_quality: Annotated[int, Field(ge=1, le=95)]


@dataclass(frozen=True)
class Job:
    image_id: str
    path: str  # as written in the input manifest
    source: Path  # the input file
    target: Path  # the resized file, inside the work directory


@dataclass(frozen=True)
class Failure:
    image_id: str
    path: str  # as written in the input manifest
    error: str


@dataclass(frozen=True)
class Summary:
    images_in: int
    images_out: int
    resized: int
    resumed: int
    corrupt: int
    queries_in: int
    queries_out: int
    seconds: float

    def line(self, output: Path | str) -> str:
        rate = self.resized / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"resize: images {self.images_in} in, {self.images_out} out ({self.resumed} resumed), "
            f"{self.corrupt} corrupt; queries {self.queries_in} in, {self.queries_out} out; "
            f"{self.seconds:.1f} s, {rate:.0f} images/s -> {output}"
        )


# --- one image ---------------------------------------------------------------------------------


Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels, as Image.resize takes it


def square(img: Image.Image, size: int, mode: str, pad_value: int, box: Box | None = None) -> Image.Image:
    """An RGB size x size image; aspect ratio kept (crop the centre, or pad around it).

    `box` is the region of `img` that holds the picture (default: all of it); a drafted JPEG's decoded
    pixels can end with a partial row or column (see `decode_for_size`), which the box leaves out.
    """
    img = img.convert("RGB")
    box = box or (0, 0, *img.size)
    width, height = box[2] - box[0], box[3] - box[1]
    if mode == "center_crop":
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        img = img.resize(new_size, Image.Resampling.BICUBIC, box=box)
        left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
        return img.crop((left, top, left + size, top + size))
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    img = img.resize(new_size, Image.Resampling.BICUBIC, box=box)
    canvas = Image.new("RGB", (size, size), (pad_value,) * 3)
    canvas.paste(img, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def draft_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """What `square` resizes a width x height picture to, rounded down: the size to ask Image.draft for.

    center_crop brings the shorter side to `size`, pad the longer one. Draft decodes at the largest
    1/s (s in 8, 4, 2, 1) with width // s and height // s both >= the request, so the decoded picture
    is never smaller than what `square` resizes it to.
    """
    side = min(width, height) if mode == "center_crop" else max(width, height)
    return max(1, width * size // side), max(1, height * size // side)


def decode_for_size(img: Image.Image, size: int, mode: str) -> Box:
    """Decode a just-opened image, a JPEG at the smallest scale `square(..., size, mode)` can use.

    Returns the box of the picture in the decoded pixels, for `square`. For a JPEG, Image.draft makes
    libjpeg downscale by 2, 4 or 8 in the DCT domain while decoding (a reduced IDCT gives 4x4, 2x2 or
    1x1 pixels per 8x8 block), so the IDCT, chroma upsampling and colour conversion, and then the resize
    in `square`, handle scale² fewer pixels: a 1024x768 photo for size 64 is decoded at 128x96. Entropy
    decoding still reads every coefficient, so the decode alone gains only 1.2-2x on quality-90 photos;
    most of the saving is in the resize. Other formats ignore draft and are decoded in full.
    """
    full = (0, 0, *img.size)
    drafted = img.draft("RGB", draft_size(*img.size, size, mode))
    img.load()  # decode everything now, so a truncated file fails here (draft does not change that)
    # draft's box: the picture is width / s x height / s decoded pixels; where a side is not a
    # multiple of s, its last decoded pixel covers only part of s source pixels and is left out
    return drafted[1] if drafted else full


def encode(img: Image.Image, fmt: str, jpeg_quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        img.save(buffer, "JPEG", quality=jpeg_quality)
    else:
        img.save(buffer, "PNG")
    return buffer.getvalue()


def resize_file(job: Job, cfg: ResizeConfig) -> str | None:
    """Resize one file into `job.target` (atomically); returns the error text if it cannot be read."""
    try:
        with Image.open(job.source) as img:
            box = decode_for_size(img, cfg.size, cfg.mode)  # fails here on a truncated file
            result = square(img, cfg.size, cfg.mode, cfg.pad_value, box)
    except UNREADABLE as err:
        return f"{type(err).__name__}: {err}"
    write_bytes(job.target, encode(result, cfg.format, cfg.jpeg_quality))
    return None


# --- the whole set -----------------------------------------------------------------------------


def resume_key(cfg: ResizeConfig, input_dir: Path) -> str:
    """Everything the resized files depend on: the params and the input image manifest."""
    digest = hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True).encode())
    digest.update((input_dir / manifest.IMAGES_FILE).read_bytes())
    return digest.hexdigest()


def output_path(input_path: str, fmt: str) -> str:
    """The input's relative path with the format's extension, e.g. images/a/b.jpeg -> images/a/b.png."""
    path = PurePosixPath(input_path)
    if path.is_absolute() or ".." in path.parts:
        raise StageError(f"image path {input_path!r} must stay inside the manifest's directory")
    return str(path.with_suffix(EXTENSIONS[fmt]))


def plan_outputs(images: pa.Table, fmt: str) -> dict[str, str]:
    """image_id -> output relative path; two inputs that would land on one file are an error."""
    outputs, owner = {}, {}
    for image_id, path in zip(images.column("image_id").to_pylist(), images.column("path").to_pylist()):
        out = output_path(path, fmt)
        if out in owner:
            raise StageError(f"images {owner[out]!r} and {image_id!r} would both be resized to {out}")
        owner[out] = image_id
        outputs[image_id] = out
    return outputs


def remove_stale_temp_files(work: Path) -> None:
    """A killed run can leave the hidden temp files of stages.common.atomic; they must not reach the output."""
    for tmp in work.rglob(".*.tmp-*"):
        tmp.unlink()


def resize_all(jobs: list[Job], cfg: ResizeConfig, parallel: ParallelConfig = SERIAL) -> list[Failure]:
    """Run the jobs (in parallel as `parallel` says, see stages.common.parallel); returns the images that could not be read."""
    results = map_items(partial(resize_file, cfg=cfg), jobs, parallel, "resize", label=attrgetter("path"), unit="img")
    return [Failure(job.image_id, job.path, error) for job, error in zip(jobs, results) if error is not None]


def keep_images(images: pa.Table, outputs: dict[str, str], excluded: set[str]) -> pa.Table:
    rows = [
        {**row, "path": outputs[row["image_id"]]} for row in images.to_pylist() if row["image_id"] not in excluded
    ]
    return pa.Table.from_pylist(rows, schema=manifest.IMAGES_SCHEMA)


def keep_queries(queries: pa.Table, excluded: set[str]) -> pa.Table:
    rows = [q for q in queries.to_pylist() if q["reference_id"] not in excluded and q["target_id"] not in excluded]
    return pa.Table.from_pylist(rows, schema=manifest.QUERIES_SCHEMA)


def report_failures(failures: Iterable[Failure], shown: int = 20) -> None:
    failures = list(failures)
    for f in failures[:shown]:
        print(f"resize: corrupt image {f.image_id!r} ({f.path}): {f.error}", file=sys.stderr)
    if len(failures) > shown:
        print(f"resize: ... and {len(failures) - shown} more corrupt images, see {REPORT_FILE}", file=sys.stderr)


def carry_image_text_files(input_dir: Path, work: Path, images: pa.Table, kept_images: pa.Table,
                           excluded: set[str]) -> dict:
    """Image-text matching datasets also have captions.parquet and (COCO) folds.json: pass them on
    without the captions and fold entries of the excluded images. Returns counts for the report."""
    counts = {}
    if (input_dir / captions.CAPTIONS_FILE).exists():
        table = captions.read(input_dir, images)
        kept = table.filter(pc.invert(pc.is_in(table.column("image_id"), pa.array(sorted(excluded), pa.string()))))
        captions.write(work, kept, kept_images)
        counts.update(captions_in=table.num_rows, captions_out=kept.num_rows)
    if (input_dir / captions.FOLDS_FILE).exists():
        folds = json.loads((input_dir / captions.FOLDS_FILE).read_text())
        write_json(work / captions.FOLDS_FILE, {name: [i for i in ids if i not in excluded] if isinstance(ids, list) else ids
                                       for name, ids in folds.items()})
    return counts


def run_resize(input_dir: Path | str, output_dir: Path | str, cfg: ResizeConfig,
               parallel: ParallelConfig = SERIAL) -> Summary:
    """Resize the prepared dataset in `input_dir` into `output_dir` (see the module doc)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise StageError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images would pass as valid")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    images, queries = manifest.read(input_dir)
    outputs = plan_outputs(images, cfg.format)
    start = time.perf_counter()
    with staged_dir(output_dir, resume_key(cfg, input_dir)) as work:
        remove_stale_temp_files(work)
        source, target = input_dir.absolute(), work.absolute()  # workers elsewhere need no cwd
        jobs = [Job(image_id, path, source / path, target / outputs[image_id])
                for image_id, path in zip(images.column("image_id").to_pylist(), images.column("path").to_pylist())]
        todo = [job for job in jobs if not job.target.exists()]
        failures = resize_all(todo, cfg, parallel)
        excluded = {f.image_id for f in failures}
        kept_images, kept_queries = keep_images(images, outputs, excluded), keep_queries(queries, excluded)
        manifest.write(work, kept_images, kept_queries)
        carried = carry_image_text_files(input_dir, work, images, kept_images, excluded)
        if (input_dir / evaluation.EVALUATION_FILE).exists():
            write_bytes(work / evaluation.EVALUATION_FILE, (input_dir / evaluation.EVALUATION_FILE).read_bytes())
        write_json(work / REPORT_FILE, {
            **carried,
            "images_in": images.num_rows,
            "images_out": kept_images.num_rows,
            "corrupt": [asdict(f) for f in failures],
            "queries_in": queries.num_rows,
            "queries_out": kept_queries.num_rows,
            "queries_dropped": queries.num_rows - kept_queries.num_rows,
        })
    report_failures(failures)
    return Summary(
        images_in=images.num_rows, images_out=kept_images.num_rows, resized=len(todo) - len(failures),
        resumed=len(jobs) - len(todo), corrupt=len(failures), queries_in=queries.num_rows,
        queries_out=kept_queries.num_rows, seconds=time.perf_counter() - start,
    )


def check_params(params_path: Path | str = PARAMS_FILE, declared: dict | None = None) -> None:
    load(ResizeConfig, "resize", params_path)
    load(ParallelConfig, "parallel", params_path)


def resize(input_dir: Path | str, output_dir: Path | str, params_path: Path | str = PARAMS_FILE) -> str:
    """The stage: read `resize` and `parallel` params, run, return the one-line summary."""
    check_from("resize", params_path, evaluation.declared_in(input_dir))
    cfg = load(ResizeConfig, "resize", params_path)
    parallel = load(ParallelConfig, "parallel", params_path)
    return run_resize(input_dir, output_dir, cfg, parallel).line(output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "python -m stages.resize --prepared data/prepared --out data/resized",
                          "output directory: the resized images and their manifests, report.json")
    parser.add_argument("--prepared", type=Path, required=True, help="the `prepare` stage's folder")
    args = parser.parse_args(argv)
    run_stage(lambda: print(resize(args.prepared, args.out, args.params)))


if __name__ == "__main__":
    main()
