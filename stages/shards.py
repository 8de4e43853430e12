"""The WebDataset shards: how samples are laid out, written, indexed, verified and read back.

    <shard_dir>/index.json                    splits, shards, sample counts, sha256 of every shard (and of folds.json)
    <shard_dir>/<split>/gallery-000000.tar    one sample per image:  <key>.png|jpg, <key>.json
    <shard_dir>/<split>/queries-000000.tar    one sample per query:  <key>.ref.png|jpg, <key>.tgt.png|jpg, <key>.json
    <shard_dir>/folds.json                    only when the dataset has one (COCO 1K): {fold: [image_id, ...]}

The `json` member carries the real ids; the sample key is only a tar-safe name derived from them
(see `key`). A gallery sample's json is {image_id, caption, captions}: `captions` lists every caption
of the image as {caption_id, text} (image-text matching datasets have several; otherwise it is the
one `caption`, with the image_id as caption_id). Shards written before `captions` existed are read as
if they had that one entry. Image bytes are stored as the resized files are, never re-encoded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from stages.atomic import write_bytes
from stages.cli import StageError

INDEX_FILE = "index.json"
INDEX_FORMAT = 1
KINDS = ("gallery", "queries")
IMAGE_EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")

_UNSAFE_KEY_CHAR = re.compile(r"[^A-Za-z0-9_-]")
# USTAR names hold 100 bytes; with "-" + 10 hex of hash and the longest member suffix (".ref.png")
# a key of at most 80 safe characters always fits.
_MAX_KEY_STEM = 80


# --- keys ----------------------------------------------------------------------------------------


def key(id: str) -> str:
    """A sample key that WebDataset reads back unchanged.

    WebDataset splits a member name at the first dot of its basename, so dots (and slashes) in an
    id would cut the key short. Unsafe characters become `_`; if that changed the id (or the id is
    too long for a tar member name and is cut), the first 10 hex digits of sha1(id) are appended,
    so ids that differ only in those characters stay distinct.
    """
    if not id:
        raise StageError("an empty id has no shard key")
    safe = _UNSAFE_KEY_CHAR.sub("_", id)
    if safe == id and len(id) <= _MAX_KEY_STEM:
        return id
    return f"{safe[:_MAX_KEY_STEM]}-{hashlib.sha1(id.encode('utf-8')).hexdigest()[:10]}"


def unique_keys(ids: Iterable[str]) -> list[str]:
    """key(id) for every id; two ids with one key are an error (WebDataset would merge their samples)."""
    owner: dict[str, str] = {}
    keys = []
    for id in ids:
        k = key(id)
        if k in owner and owner[k] != id:
            raise StageError(f"ids {owner[k]!r} and {id!r} have the same shard key {k!r}")
        owner[k] = id
        keys.append(k)
    return keys


# --- samples -------------------------------------------------------------------------------------


def image_extension(path: Path | str) -> str:
    """'png' or 'jpg', the member suffix for an image file."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise StageError(f"{path}: not a png or jpeg file name; shards store png and jpg images")
    return IMAGE_EXTENSIONS[suffix]


def _json_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def single_caption(image_id: str, caption: str) -> list[dict[str, str]]:
    """The `captions` of an image that has only its manifest caption."""
    return [{"caption_id": image_id, "text": caption}]


def gallery_sample(sample_key: str, image_id: str, caption: str, image_path: Path,
                   captions: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """`captions`: every caption of the image as {caption_id, text}; None = the one `caption`."""
    if captions is None:
        captions = single_caption(image_id, caption)
    return {
        "__key__": sample_key,
        image_extension(image_path): image_path.read_bytes(),
        "json": _json_bytes({"image_id": image_id, "caption": caption, "captions": captions}),
    }


def sample_captions(meta: dict[str, Any]) -> list[dict[str, str]]:
    """A gallery sample's captions as {caption_id, text}; an old shard's sample has only `caption`."""
    if "captions" in meta:
        return meta["captions"]
    return single_caption(meta["image_id"], meta["caption"])


def query_sample(sample_key: str, query: dict[str, str], reference_path: Path, target_path: Path) -> dict[str, Any]:
    return {
        "__key__": sample_key,
        f"ref.{image_extension(reference_path)}": reference_path.read_bytes(),
        f"tgt.{image_extension(target_path)}": target_path.read_bytes(),
        "json": _json_bytes({k: query[k] for k in ("query_id", "reference_id", "target_id", "text")}),
    }


# --- writing -------------------------------------------------------------------------------------


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_split_name(split: str) -> None:
    """Split names become folder names and part of a %-pattern: keep them plain."""
    if not SPLIT_NAME.fullmatch(split):
        raise StageError(f"split {split!r}: shard folders need a name of letters, digits, '_' or '-'")


def write_shards(
    shard_dir: Path, split: str, kind: str, samples: Iterable[dict[str, Any]], maxcount: int, maxsize: int
) -> dict[str, Any]:
    """Write samples to `<shard_dir>/<split>/<kind>-%06d.tar`; returns the index entry of this kind.

    A shard is closed once it holds `maxcount` samples or `maxsize` bytes of payload (so it can
    exceed maxsize by one sample). No samples, no shard file. Tar headers get mtime 0, so the same
    samples give byte-identical shards.
    """
    check_split_name(split)
    (shard_dir / split).mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}  # shard file -> samples, in writing order
    writer = None
    try:
        for sample in samples:
            if writer is None:  # ShardWriter creates its first file at once: only open it for a sample
                writer = wds.ShardWriter(
                    str(shard_dir / split / f"{kind}-%06d.tar"),
                    maxcount=maxcount, maxsize=maxsize, verbose=0, encoder=False, mtime=0,
                )
            writer.write(sample)
            counts[writer.fname] = counts.get(writer.fname, 0) + 1
    finally:
        if writer is not None:
            writer.close()
    shards = [
        {"file": Path(fname).relative_to(shard_dir).as_posix(), "count": n, "sha256": file_sha256(fname)}
        for fname, n in counts.items()
    ]
    return {"count": sum(counts.values()), "shards": shards}


def write_folds(shard_dir: Path, source: Path) -> dict[str, str]:
    """Check `source` is a folds file, copy it unchanged (atomically) into `shard_dir` under its own
    name; returns the index entry {file, sha256}."""
    _parse_folds(source)
    target = shard_dir / source.name
    write_bytes(target, source.read_bytes())
    return {"file": source.name, "sha256": file_sha256(target)}


# --- reading -------------------------------------------------------------------------------------


def _read_json(path: Path, missing_hint: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: missing ({missing_hint})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: not valid JSON: {err}") from None


def _parse_folds(path: Path) -> dict[str, list[str]]:
    folds = _read_json(path, "did the shard stage run?")
    if not isinstance(folds, dict) or not all(
        isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in folds.values()
    ):
        raise StageError(f"{path}: not a folds file ({{fold: [image_id, ...]}})")
    return folds


def read_index(shard_dir: Path | str) -> dict[str, Any]:
    path = Path(shard_dir) / INDEX_FILE
    index = _read_json(path, "did the shard stage run?")
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("splits"), dict):
        raise StageError(f"{path}: not a shard index of format {INDEX_FORMAT}")
    return index


def _entry(index: dict[str, Any], shard_dir: Path | str, split: str, kind: str) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    splits = index["splits"]
    if split not in splits:
        raise StageError(f"{Path(shard_dir) / INDEX_FILE}: no split {split!r} (have {sorted(splits)})")
    return splits[split][kind]


def shard_paths(shard_dir: Path | str, split: str, kind: str) -> list[str]:
    """Absolute paths of the shards of one split and kind ("gallery" or "queries"), in order."""
    entry = _entry(read_index(shard_dir), shard_dir, split, kind)
    return [os.path.abspath(Path(shard_dir) / shard["file"]) for shard in entry["shards"]]


def read_folds(shard_dir: Path | str) -> dict[str, list[str]] | None:
    """The dataset's folds.json ({fold: [image_id, ...]}, COCO 1K) if the shards carry one, else None."""
    entry = read_index(shard_dir).get("folds")
    return None if entry is None else _parse_folds(Path(shard_dir) / entry["file"])


def verify(shard_dir: Path | str) -> None:
    """Recompute the sha256 of every shard (and of folds.json) and compare it with the index; raise
    naming the first bad file."""
    index = read_index(shard_dir)
    checked = [(shard, "shard")
               for kinds in index["splits"].values() for kind in KINDS for shard in kinds[kind]["shards"]]
    if "folds" in index:
        checked.append((index["folds"], "file"))
    for entry, what in checked:
        path = Path(shard_dir) / entry["file"]
        if not path.is_file():
            raise StageError(f"{path}: {what} listed in {INDEX_FILE} is missing")
        if file_sha256(path) != entry["sha256"]:
            raise StageError(f"{path}: sha256 differs from {INDEX_FILE} (corrupt or modified {what})")


def _raw_samples(urls: list[str], select_files: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Undecoded samples of `urls` in order: every shard, whatever the node or DataLoader worker;
    only the members whose name passes `select_files` (None = all) are read."""
    if not urls:
        return iter(())
    return iter(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False,
                               select_files=select_files))


def _is_json(name: str) -> bool:
    return name.endswith(".json")


def image_member(sample: dict[str, Any], prefix: str = "") -> bytes:
    names = [f"{prefix}{ext}" for ext in sorted(set(IMAGE_EXTENSIONS.values())) if f"{prefix}{ext}" in sample]
    if len(names) != 1:
        raise StageError(f"{sample.get('__url__')}: sample {sample['__key__']!r} has no single {prefix}png|jpg image")
    return sample[names[0]]


def iter_gallery(shard_dir: Path | str, split: str) -> Iterator[tuple[str, str, bytes]]:
    """(image_id, caption, image file bytes) of every gallery image of a split, in shard order."""
    for sample in _raw_samples(shard_paths(shard_dir, split, "gallery")):
        meta = json.loads(sample["json"])
        yield meta["image_id"], meta["caption"], image_member(sample)


def iter_queries(shard_dir: Path | str, split: str) -> Iterator[dict[str, Any]]:
    """Every query of a split, in shard order: query_id, reference_id, target_id, text, ref, tgt (bytes)."""
    for sample in _raw_samples(shard_paths(shard_dir, split, "queries")):
        meta = json.loads(sample["json"])
        yield {**meta, "ref": image_member(sample, "ref."), "tgt": image_member(sample, "tgt.")}


def iter_captions(shard_dir: Path | str, split: str) -> Iterator[tuple[str, str, str]]:
    """(caption_id, image_id, text) of every caption of every gallery image of a split, in shard
    order (an image's captions in captions.parquet order). Image bytes are not read."""
    for sample in _raw_samples(shard_paths(shard_dir, split, "gallery"), select_files=_is_json):
        meta = json.loads(sample["json"])
        for caption in sample_captions(meta):
            yield caption["caption_id"], meta["image_id"], caption["text"]
