"""The `index` stage's output: a trained model's features of each evaluation split, read back by stages.search and
stages.app so that a query never re-embeds the gallery.

    <index>/index.json                  model (path as given), model_sha256, model_name, task, dim, per split counts
    <index>/<split>/gallery.npy         N x d float32, L2-normalised: the gallery images (the image tower's vectors)
    <index>/<split>/gallery.parquet     image_id, caption of each row of gallery.npy, in shard order
    <index>/<split>/captions.npy        M x d float32, L2-normalised (task matching only): every caption of the split
    <index>/<split>/captions.parquet    caption_id, image_id, text of each row of captions.npy

An index belongs to one model file: reading it with another (a different sha256) is an error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from stages.common.atomic import write_json
from stages.common.errors import StageError
from stages.shards import store

INDEX_FILE = "index.json"
FORMAT = 1
TASKS = ("composed", "matching")


def model_task(model: nn.Module) -> str:
    """'composed' for a composition model (it has `compose`), 'matching' for an image-text matching model."""
    if hasattr(model, "compose"):
        return "composed"
    if hasattr(model, "encode_text") and hasattr(model, "encode_image"):
        return "matching"
    raise StageError(f"{type(model).__name__} is neither a composition model (compose) nor an image-text "
                     f"matching model (encode_text, encode_image)")


@dataclass
class SplitIndex:
    """The features of one split; the caption fields are None for a composed-retrieval index."""
    image_ids: list[str]
    captions: list[str]          # each gallery image's caption
    gallery: torch.Tensor        # N x d, unit rows
    caption_ids: list[str] | None = None
    caption_images: list[str] | None = None  # the image id of each caption
    caption_texts: list[str] | None = None
    caption_features: torch.Tensor | None = None  # M x d, unit rows
    rows: dict[str, int] = field(init=False, repr=False)  # image id -> its gallery row

    def __post_init__(self):
        self.rows = {image_id: row for row, image_id in enumerate(self.image_ids)}


def write_split(folder: Path, split: str, image_ids: list[str], captions: list[str], gallery: torch.Tensor,
                caption_rows: tuple[list[str], list[str], list[str]] | None = None,
                caption_features: torch.Tensor | None = None) -> dict[str, int]:
    """Write one split's files into `folder` (the index being built); returns its counts.
    caption_rows: (caption ids, their image ids, their texts), with caption_features (task matching)."""
    store.check_split_name(split)
    where = Path(folder) / split
    where.mkdir(parents=True, exist_ok=True)
    np.save(where / "gallery.npy", gallery.float().numpy())
    pq.write_table(pa.table({"image_id": image_ids, "caption": captions}), where / "gallery.parquet")
    counts = {"gallery": len(image_ids)}
    if caption_rows is not None:
        caption_ids, caption_images, texts = caption_rows
        np.save(where / "captions.npy", caption_features.float().numpy())
        pq.write_table(pa.table({"caption_id": caption_ids, "image_id": caption_images, "text": texts}),
                       where / "captions.parquet")
        counts["captions"] = len(caption_ids)
    return counts


def write_manifest(folder: Path, model_path: Path, model_name: str, task: str, dim: int,
                   counts: dict[str, dict[str, int]]) -> dict:
    manifest = {"format": FORMAT, "model": str(model_path), "model_sha256": store.file_sha256(model_path),
                "model_name": model_name, "task": task, "dim": dim, "splits": counts}
    write_json(Path(folder) / INDEX_FILE, manifest)
    return manifest


def read_manifest(folder: Path) -> dict:
    """index.json of an index folder; a missing or foreign one is a StageError naming it."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise StageError(f"{path}: no feature index there (build it with `dvc repro index`, or "
                         f"`python -m stages.index --model ... --shards ... --out {folder}`)")
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("task") not in TASKS:
        raise StageError(f"{path}: not a feature index of format {FORMAT}")
    return manifest


def check_model(manifest: dict, folder: Path, model_path: Path) -> None:
    """The index must have been built from this very model file."""
    digest = store.file_sha256(model_path)
    if digest != manifest["model_sha256"]:
        raise StageError(f"{folder}: index built from another model: re-run `dvc repro index` "
                         f"(the index is of sha256 {manifest['model_sha256'][:12]}..., {model_path} is "
                         f"{digest[:12]}...)")


def open_index(folder: Path, model_path: Path) -> dict:
    """The manifest of the index at `folder`, checked against `model_path`."""
    manifest = read_manifest(folder)
    check_model(manifest, folder, model_path)
    return manifest


def load_split(folder: Path, manifest: dict, split: str) -> SplitIndex:
    """One split's features and ids; a split the index does not hold is a StageError listing those it does."""
    if split not in manifest["splits"]:
        raise StageError(f"{Path(folder) / INDEX_FILE}: no split {split!r} in the index "
                         f"(it has {', '.join(sorted(manifest['splits']))})")
    where = Path(folder) / split
    gallery = pq.read_table(where / "gallery.parquet")
    features = torch.from_numpy(np.load(where / "gallery.npy"))
    _check_rows(where / "gallery.npy", features, gallery.num_rows, manifest["dim"])
    out = SplitIndex(gallery.column("image_id").to_pylist(), gallery.column("caption").to_pylist(), features)
    if manifest["task"] == "matching":
        captions = pq.read_table(where / "captions.parquet")
        out.caption_features = torch.from_numpy(np.load(where / "captions.npy"))
        _check_rows(where / "captions.npy", out.caption_features, captions.num_rows, manifest["dim"])
        out.caption_ids = captions.column("caption_id").to_pylist()
        out.caption_images = captions.column("image_id").to_pylist()
        out.caption_texts = captions.column("text").to_pylist()
    return out


def _check_rows(path: Path, features: torch.Tensor, rows: int, dim: int) -> None:
    if features.ndim != 2 or features.shape != (rows, dim) or features.dtype != torch.float32:
        raise StageError(f"{path}: {tuple(features.shape)} {features.dtype}, expected ({rows}, {dim}) float32: "
                         f"a damaged index, re-run `dvc repro index`")
