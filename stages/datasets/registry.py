"""Dataset adapters: each turns one source (a generator, FashionIQ, COCO, ...) into the two manifests.

An adapter is a module exposing
    Config                        a `@section` dataclass for its own params subsection `dataset.<name>`
    EVALUATION                    how the dataset is scored (stages.datasets.evaluation.Evaluation): what
                                  `evaluate`'s `auto` params become
    build(cfg, out_dir: Path, download: DownloadConfig)
                                  fetches what it needs into its `raw_dir` (real datasets), writes
                                  image files under `out_dir/images/` and returns the (images,
                                  queries) tables of `stages.datasets.manifest`, with image paths relative
                                  to `out_dir` (e.g. `images/<image_id>.png`); an adapter that
                                  computes its images also takes `parallel: ParallelConfig` (a
                                  keyword, default serial) and spreads them with stages.common.parallel

Adding a dataset means adding a module in this folder and a line to ADAPTERS; the `prepare` stage stays the same.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from stages.common.params import ParamsError

# Imported lazily so that an adapter's heavy or optional dependencies load only when it is chosen.
ADAPTERS: dict[str, str] = {
    "shapes": "stages.datasets.shapes",
    "shapes_captions": "stages.datasets.shapes_captions",
    "fashioniq": "stages.datasets.fashioniq",
    "shoes": "stages.datasets.shoes",
    "cirr": "stages.datasets.cirr",
    "css3d": "stages.datasets.css3d",
    "mitstates": "stages.datasets.mitstates",
    "fashion200k": "stages.datasets.fashion200k",
    "coco": "stages.datasets.coco",
    "flickr30k": "stages.datasets.flickr30k",
}


def load_adapter(name: str) -> ModuleType:
    """The adapter module registered under `name`; an unknown name is a ParamsError on `dataset.name`."""
    if name not in ADAPTERS:
        known = ", ".join(sorted(ADAPTERS))
        raise ParamsError(f"dataset.name: unknown dataset {name!r}; known adapters: {known}")
    return importlib.import_module(ADAPTERS[name])
