"""Stage `prepare`: build the chosen dataset into images + the two manifests.

    python -m stages.prepare --out data/prepared

Reads the `dataset`, `download` and `parallel` sections of params.yaml: `dataset.name` picks an adapter
under stages/datasets/, `dataset.<name>` is that adapter's own params, `download` says how real
datasets are fetched (workers, retries, timeouts) into their `raw_dir` under data/raw/, and `parallel`
how an adapter that computes its images spreads the work (shapes renders its scenes through
stages.common.parallel: a process pool, or Dask workers through Prefect). The output directory appears only once it is complete:

    <out>/images/...        the image files
    <out>/images.parquet    image manifest (see stages.datasets.manifest)
    <out>/queries.parquet   query manifest
    <out>/evaluation.json   how the dataset is evaluated (the adapter's EVALUATION; stages.datasets.evaluation)
    <out>/<extra files>     whatever the adapter records (shapes: shapes.json)
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa

from stages.datasets import manifest
from stages.common.atomic import staged_dir
from stages.common.errors import run_stage
from stages.common.validation import check_from
from stages.datasets import evaluation
from stages.datasets.registry import ADAPTERS, load_adapter
from stages.datasets.download import DownloadConfig
from stages.common.parallel import ParallelConfig
from stages.common.params import PARAMS_FILE, ParamsError, load, parse, read_yaml
from stages.common.cli import stage_parser


@dataclass(frozen=True)
class DatasetParams:
    name: str
    adapter: ModuleType
    config: Any  # the adapter's Config


def load_dataset_params(path: Path | str = PARAMS_FILE) -> DatasetParams:
    """Parse `dataset.name`, then the chosen adapter's subsection `dataset.<name>` with its Config."""
    raw = read_yaml(Path(path))
    dataset = raw.get("dataset")
    if not isinstance(dataset, dict):
        raise ParamsError(f"{path}: section 'dataset' is missing or not a mapping")
    # Subsections of adapters other than the chosen one may stay, so `-S dataset.name=...` switches.
    for key in dataset:
        if key != "name" and key not in ADAPTERS:
            raise ParamsError(f"{path}: dataset.{key}: unknown key (expected 'name' or one of {sorted(ADAPTERS)})")
    name = dataset.get("name")
    if not isinstance(name, str):
        raise ParamsError(f"{path}: dataset.name: expected the name of an adapter, got {name!r}")
    try:
        adapter = load_adapter(name)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    if name not in dataset:
        raise ParamsError(f"{path}: dataset.{name}: missing (the params of the '{name}' adapter)")
    return DatasetParams(name, adapter, parse(adapter.Config, f"dataset.{name}", dataset[name], path))


def per_split(table: pa.Table) -> str:
    """E.g. 'novel=2000 test=1997 train=15913': the table's rows counted per split."""
    counts = Counter(table.column("split").to_pylist())
    return " ".join(f"{split}={counts[split]}" for split in sorted(counts)) or "none"


def build(params: DatasetParams, work: Path, download: DownloadConfig, parallel: ParallelConfig):
    """The adapter's build; `parallel` goes to the adapters that take it (those that compute images)."""
    if "parallel" in inspect.signature(params.adapter.build).parameters:
        return params.adapter.build(params.config, work, download, parallel=parallel)
    return params.adapter.build(params.config, work, download)


def check_params(params_path: Path | str = PARAMS_FILE, declared: dict | None = None) -> None:
    load_dataset_params(params_path)
    load(DownloadConfig, "download", params_path)
    load(ParallelConfig, "parallel", params_path)


def prepare(out: Path | str, params_path: Path | str = PARAMS_FILE) -> str:
    """Build the dataset into `out`; returns a one-line summary."""
    params = load_dataset_params(params_path)
    check_from("prepare", params_path, params.adapter.EVALUATION.as_json())
    download = load(DownloadConfig, "download", params_path)
    parallel = load(ParallelConfig, "parallel", params_path)
    with staged_dir(out) as work:
        images, queries = build(params, work, download, parallel)
        manifest.write(work, images, queries)
        evaluation.write(work, params.adapter.EVALUATION)
    return f"prepare {params.name}: images {per_split(images)}; queries {per_split(queries)} -> {out}"


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "python -m stages.prepare --out data/prepared",
                          "output directory: images/, images.parquet, queries.parquet")
    args = parser.parse_args(argv)
    run_stage(lambda: print(prepare(args.out, args.params)))


if __name__ == "__main__":
    main()
