"""Stage `shard`: the resized dataset -> WebDataset tar shards per split, with a checksummed index.

    python -m stages.shard --resized data/resized --out data/shards

Reads the `shard` and `parallel` sections of params.yaml. For every split: gallery shards (one
sample per image, with every caption of the image from captions.parquet when the input has one, else
its manifest caption) and query shards (one sample per query, with both images), in manifest order;
folds.json and evaluation.json, when the input has them, are copied beside them. Layout and sample format in
stages.shards.store. The output directory appears only once complete.

Where each shard ends is planned here, from the image file sizes (stat) and the json members, exactly
as webdataset's ShardWriter would cut the stream (`plan_shards`); each tar is then written whole, by
`store.write_shards`, in parallel as `parallel` says (stages.common.parallel): the same bytes as one
sequential ShardWriter, whatever the workers.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field
from typing_extensions import Annotated

from stages.common.validation import check_from
from stages.datasets import captions, evaluation, manifest
from stages.shards import store
from stages.common.atomic import staged_dir, write_json
from stages.common.errors import StageError, run_stage
from stages.common.parallel import SERIAL, ParallelConfig, map_items
from stages.common.params import PARAMS_FILE, load, section
from stages.common.cli import stage_parser


@section
class ShardConfig:
    maxcount: Annotated[int, Field(gt=0)]  # samples per tar
    maxsize: Annotated[int, Field(gt=0)]  # payload bytes per tar


@dataclass(frozen=True)
class Summary:
    splits: dict[str, dict[str, Any]]  # the index's "splits"
    megabytes: float
    seconds: float

    def line(self, output: Path | str) -> str:
        parts = [
            f"{split} gallery {kinds['gallery']['count']}/{len(kinds['gallery']['shards'])} "
            f"queries {kinds['queries']['count']}/{len(kinds['queries']['shards'])}"
            for split, kinds in sorted(self.splits.items())
        ]
        return (
            f"shard: samples/shards {'; '.join(parts)}; {self.megabytes:.1f} MB in {self.seconds:.1f} s -> {output}"
        )


def gallery_samples(images: list[dict[str, str]], input_dir: Path,
                    captions_of: dict[str, list[dict[str, str]]] | None, read=Path.read_bytes):
    """`captions_of`: image_id -> its captions as {caption_id, text}; None = each image's own caption."""
    for sample_key, image in zip(store.unique_keys(i["image_id"] for i in images), images):
        own = None if captions_of is None else captions_of[image["image_id"]]
        yield store.gallery_sample(sample_key, image["image_id"], image["caption"], input_dir / image["path"], own,
                                    read)


def query_samples(queries: list[dict[str, str]], path_of: dict[str, str], input_dir: Path, read=Path.read_bytes):
    for sample_key, query in zip(store.unique_keys(q["query_id"] for q in queries), queries):
        reference, target = input_dir / path_of[query["reference_id"]], input_dir / path_of[query["target_id"]]
        yield store.query_sample(sample_key, query, reference, target, read)


def rows_by_split(table: pa.Table, splits: list[str]) -> dict[str, list[dict[str, str]]]:
    """The table's rows grouped by split, each group in table order."""
    groups: dict[str, list[dict[str, str]]] = {split: [] for split in splits}
    for row in table.to_pylist():
        groups[row["split"]].append(row)
    return groups


def image_captions(input_dir: Path, images: pa.Table) -> dict[str, list[dict[str, str]]] | None:
    """image_id -> its captions from the input's captions.parquet (checked: every image has one);
    None when the input has no captions file."""
    if not (input_dir / captions.CAPTIONS_FILE).exists():
        return None
    return captions.of_images(captions.read(input_dir, images), images, input_dir)


# --- planned shards, written in parallel ---------------------------------------------------------


@dataclass(frozen=True)
class ImageFile:
    """An image member not read yet: its size for the plan, its bytes in the worker that writes the shard."""
    path: Path
    size: int

    @classmethod
    def stat(cls, path: Path) -> ImageFile:
        return cls(Path(path), os.stat(path).st_size)

    def read(self) -> bytes:
        data = self.path.read_bytes()
        if len(data) != self.size:
            raise StageError(f"{self.path}: changed while the shards were written ({self.size} -> {len(data)} bytes)")
        return data


@dataclass(frozen=True)
class ShardJob:
    """One tar: `<work>/<split>/<kind>-<number>.tar` holding `samples` (image members deferred)."""
    work: Path
    split: str
    kind: str
    number: int
    samples: list[dict[str, Any]]

    @property
    def file(self) -> str:
        return f"{self.split}/{self.kind}-{self.number:06d}.tar"


def payload_size(sample: dict[str, Any]) -> int:
    """What webdataset's TarWriter.write returns for the sample: the bytes of its members ('_' keys skipped)."""
    return sum(v.size if isinstance(v, ImageFile) else len(v) for k, v in sample.items() if not k.startswith("_"))


def plan_shards(samples, maxcount: int, maxsize: int) -> list[list[dict[str, Any]]]:
    """The samples cut into shards where webdataset's ShardWriter cuts them: a new shard before a
    sample once the current one holds `maxcount` samples or `maxsize` payload bytes."""
    planned: list[list[dict[str, Any]]] = []
    count = size = 0
    for sample in samples:
        if not planned or count >= maxcount or size >= maxsize:
            planned.append([])
            count = size = 0
        planned[-1].append(sample)
        count += 1
        size += payload_size(sample)
    return planned


def write_shard(job: ShardJob, maxcount: int, maxsize: int) -> dict[str, Any]:
    """Write one planned shard with store.write_shards (aside, then renamed to its number); its index entry."""
    samples = ({k: v.read() if isinstance(v, ImageFile) else v for k, v in sample.items()} for sample in job.samples)
    aside = job.work / f".{job.split}-{job.kind}-{job.number:06d}.partial"
    try:
        entry = store.write_shards(aside, job.split, job.kind, samples, maxcount, maxsize)  # read as written
        if len(entry["shards"]) != 1 or entry["count"] != len(job.samples):  # the plan must match ShardWriter
            raise RuntimeError(f"{job.file}: planned {len(job.samples)} samples in one shard, "
                               f"ShardWriter wrote {[s['count'] for s in entry['shards']]}")
        (job.work / job.split).mkdir(parents=True, exist_ok=True)
        os.replace(aside / entry["shards"][0]["file"], job.work / job.file)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return {"file": job.file, "count": entry["count"], "sha256": entry["shards"][0]["sha256"]}


def plan_split(work: Path, split: str, images: list[dict[str, str]], queries: list[dict[str, str]],
               path_of: dict[str, str], input_dir: Path, cfg: ShardConfig,
               captions_of: dict[str, list[dict[str, str]]] | None = None) -> dict[str, list[ShardJob]]:
    """The gallery and query shards of one split, planned: kind -> its shards in order."""
    input_dir, work = input_dir.absolute(), work.absolute()  # workers elsewhere need no cwd
    # image members as ImageFiles (stat only): their bytes are read by the worker that writes the shard
    samples = {"gallery": gallery_samples(images, input_dir, captions_of, ImageFile.stat),
               "queries": query_samples(queries, path_of, input_dir, ImageFile.stat)}
    return {kind: [ShardJob(work, split, kind, number, planned)
                   for number, planned in enumerate(plan_shards(samples[kind], cfg.maxcount, cfg.maxsize))]
            for kind in store.KINDS}


def write_splits(work: Path, plans: dict[str, dict[str, list[ShardJob]]], cfg: ShardConfig,
                 parallel: ParallelConfig) -> dict[str, dict[str, Any]]:
    """Write every planned shard of every split (one parallel run); the index's "splits"."""
    jobs = [job for kinds in plans.values() for kind in store.KINDS for job in kinds[kind]]
    written = iter(map_items(partial(write_shard, maxcount=cfg.maxcount, maxsize=cfg.maxsize), jobs, parallel,
                             "shard", label=attrgetter("file"), unit="shard"))
    index: dict[str, dict[str, Any]] = {}
    for split, kinds in plans.items():
        index[split] = {}
        for kind in store.KINDS:
            entries = [next(written) for _ in kinds[kind]]
            index[split][kind] = {"count": sum(e["count"] for e in entries), "shards": entries}
    return index


def total_megabytes(shard_dir: Path, splits: dict[str, dict[str, Any]]) -> float:
    sizes = [
        (shard_dir / shard["file"]).stat().st_size
        for kinds in splits.values() for kind in store.KINDS for shard in kinds[kind]["shards"]
    ]
    return sum(sizes) / 1e6


def run_shard(input_dir: Path | str, output_dir: Path | str, cfg: ShardConfig,
              parallel: ParallelConfig = SERIAL) -> Summary:
    """Shard the resized dataset in `input_dir` into `output_dir` (see the module doc)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    images, queries = manifest.read(input_dir)
    splits = sorted(set(images.column("split").to_pylist()))
    for split in splits:
        store.check_split_name(split)
    images_of, queries_of = rows_by_split(images, splits), rows_by_split(queries, splits)
    path_of = dict(zip(images.column("image_id").to_pylist(), images.column("path").to_pylist()))
    captions_of = image_captions(input_dir, images)
    start = time.perf_counter()
    with staged_dir(output_dir) as work:
        plans = {split: plan_split(work, split, images_of[split], queries_of[split], path_of, input_dir, cfg,
                                   captions_of) for split in splits}
        index: dict[str, Any] = {"format": store.INDEX_FORMAT, "splits": write_splits(work, plans, cfg, parallel)}
        if (input_dir / captions.FOLDS_FILE).exists():
            index["folds"] = store.write_folds(work, input_dir / captions.FOLDS_FILE)
        if (input_dir / evaluation.EVALUATION_FILE).exists():
            evaluation.read(input_dir / evaluation.EVALUATION_FILE)
            index["evaluation"] = store.write_evaluation(work, input_dir / evaluation.EVALUATION_FILE)
        write_json(work / store.INDEX_FILE, index)
        megabytes = total_megabytes(work, index["splits"])
    return Summary(index["splits"], megabytes, time.perf_counter() - start)


def check_params(params_path: Path | str = PARAMS_FILE, declared: dict | None = None) -> None:
    load(ShardConfig, "shard", params_path)
    load(ParallelConfig, "parallel", params_path)


def shard(input_dir: Path | str, output_dir: Path | str, params_path: Path | str = PARAMS_FILE) -> str:
    """The stage: read `shard` and `parallel` params, run, return the one-line summary."""
    check_from("shard", params_path, evaluation.declared_in(input_dir))
    cfg = load(ShardConfig, "shard", params_path)
    parallel = load(ParallelConfig, "parallel", params_path)
    return run_shard(input_dir, output_dir, cfg, parallel).line(output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "python -m stages.shard --resized data/resized --out data/shards",
                          "output directory: <split>/gallery-*.tar, <split>/queries-*.tar, index.json")
    parser.add_argument("--resized", type=Path, required=True, help="the `resize` stage's folder")
    args = parser.parse_args(argv)
    run_stage(lambda: print(shard(args.resized, args.out, args.params)))


if __name__ == "__main__":
    main()
