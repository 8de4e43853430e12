"""The WebDataset shards: how samples are laid out, written, indexed, verified and read back.

    <shard_dir>/index.json                    splits, shards, sample counts, sha256 of every shard (and of folds.json)
    <shard_dir>/<split>/gallery-000000.tar    one sample per image:  <key>.png|jpg, <key>.json
    <shard_dir>/<split>/queries-000000.tar    one sample per query:  <key>.ref.png|jpg, <key>.tgt.png|jpg, <key>.json
    <shard_dir>/folds.json                    only when the dataset has one (COCO 1K): {fold: [image_id, ...]}

The readers take a shard location (`location`): a local directory, or the URL of one: http(s)://, s3://,
file://, dvc://, any fsspec protocol. index.json and folds.json are read through fsspec; WebDataset streams
the shards (http(s) with curl, as it does natively; the protocols it has no opener for through fsspec, see
`_register_fsspec_openers`). A shard that cannot be read is a StageError naming it, and one read to its
end must hold the number of samples the index counts for it. See docs/storage.md.

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
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import webdataset as wds
from webdataset.gopen import gopen_schemes

from stages.common.atomic import write_bytes
from stages.common.errors import StageError

INDEX_FILE = "index.json"
INDEX_FORMAT = 1
KINDS = ("gallery", "queries")
IMAGE_EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")

LOCATION_HELP = "shard directory, or its URL (http(s)://, s3://, file://, any fsspec protocol), e.g. data/shards"

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")
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
                   captions: list[dict[str, str]] | None = None,
                   read: Callable[[Path], Any] = Path.read_bytes) -> dict[str, Any]:
    """`captions`: every caption of the image as {caption_id, text}; None = the one `caption`.
    `read`: what an image member holds (its bytes; the shard stage plans with a stand-in first)."""
    if captions is None:
        captions = single_caption(image_id, caption)
    return {
        "__key__": sample_key,
        image_extension(image_path): read(image_path),
        "json": _json_bytes({"image_id": image_id, "caption": caption, "captions": captions}),
    }


def sample_captions(meta: dict[str, Any]) -> list[dict[str, str]]:
    """A gallery sample's captions as {caption_id, text}; an old shard's sample has only `caption`."""
    if "captions" in meta:
        return meta["captions"]
    return single_caption(meta["image_id"], meta["caption"])


def query_sample(sample_key: str, query: dict[str, str], reference_path: Path, target_path: Path,
                 read: Callable[[Path], Any] = Path.read_bytes) -> dict[str, Any]:
    return {
        "__key__": sample_key,
        f"ref.{image_extension(reference_path)}": read(reference_path),
        f"tgt.{image_extension(target_path)}": read(target_path),
        "json": _json_bytes({k: query[k] for k in ("query_id", "reference_id", "target_id", "text")}),
    }


# --- writing -------------------------------------------------------------------------------------


def file_sha256(path: Path | str) -> str:
    """sha256 (hex) of a local file or, streamed, of a URL's bytes."""
    digest = hashlib.sha256()
    with (_open_url(path) if is_url(path) else open(path, "rb")) as f:
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


def write_evaluation(shard_dir: Path, source: Path) -> dict[str, str]:
    """Copy the dataset's evaluation declaration (checked by the caller: stages.datasets.evaluation.read) into
    `shard_dir` unchanged; returns the index entry {file, sha256}."""
    target = shard_dir / source.name
    write_bytes(target, source.read_bytes())
    return {"file": source.name, "sha256": file_sha256(target)}


# --- locations -----------------------------------------------------------------------------------


def is_url(location: Path | str) -> bool:
    """A str with a scheme (http://, s3://, file://, ...) is a URL; anything else is a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


def location(value: Path | str) -> Path | str:
    """A shard location (e.g. from `--shards`): a URL as str without a trailing '/', else a local Path."""
    return str(value).rstrip("/") if is_url(value) else Path(value)


def _join(where: Path | str, name: str) -> Path | str:
    return f"{where.rstrip('/')}/{name}" if is_url(where) else Path(where) / name


def _open_url(url: str, mode: str = "rb"):
    """fsspec's OpenFile for a URL read front to back. http(s): one streamed GET (block_size=0), so the
    server need not support Range requests (python -m http.server does not)."""
    kwargs = {"block_size": 0} if url.split("://", 1)[0].lower() in ("http", "https") else {}
    return fsspec.open(url, mode, **kwargs)


def _unreadable(err: BaseException) -> str:
    """Why fsspec could not open or read a URL: 'missing', 'missing (HTTP 404)' or 'unreadable (...)'
    (an HTTP status, a refused connection, no s3fs installed, an unknown protocol, ...)."""
    if not isinstance(err, OSError):
        return f"unreadable ({type(err).__name__}: {err})"
    cause = err.__cause__ or err.__context__
    status = getattr(cause, "status", None)
    if isinstance(err, FileNotFoundError) and status in (None, 404) and not isinstance(cause, OSError):
        return "missing (HTTP 404)" if status == 404 else "missing"
    detail = f"HTTP {status}" if status is not None else f"{type(cause or err).__name__}: {cause or err}"
    return f"unreadable ({detail})"


def _read_bytes(path: Path | str, missing_hint: str) -> bytes:
    """A local file's or a URL's bytes; a missing or unreadable one is a StageError naming it."""
    if not is_url(path):
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            raise StageError(f"{path}: missing ({missing_hint})") from None
    try:
        with _open_url(path) as f:
            return f.read()
    except (OSError, ImportError, ValueError) as err:  # ImportError: no s3fs etc.; ValueError: unknown protocol
        reason = _unreadable(err)
        hint = f" ({missing_hint})" if reason.startswith("missing") else ""
        raise StageError(f"{path}: {reason}{hint}") from None


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """WebDataset opener (gopen handler) for the protocols it has none of its own for: fsspec's file.
    WebDataset passes on an opener's exception without the URL: the StageError names it."""
    try:
        return _open_url(url, mode).open()
    except (OSError, ImportError, ValueError) as err:
        raise StageError(f"{url}: shard listed in {INDEX_FILE} is {_unreadable(err)}") from err


def _register_fsspec_openers() -> None:
    """webdataset.gopen opens http(s)/sftp/ftps/scp with curl, gs with gsutil, pipe: with the shell and
    nothing else: every other fsspec protocol (s3, gcs, az, memory, ...) gets `_gopen_fsspec`, and so
    does gs when gsutil is not installed."""
    for protocol in fsspec.available_protocols():
        if protocol not in gopen_schemes or (protocol == "gs" and shutil.which("gsutil") is None):
            gopen_schemes[protocol] = _gopen_fsspec


_register_fsspec_openers()


# --- reading -------------------------------------------------------------------------------------


def _read_json(path: Path | str, missing_hint: str) -> Any:
    data = _read_bytes(path, missing_hint)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: not valid JSON: {err}") from None


def index_digest(shard_dir: Path | str) -> str:
    """sha256 (hex) of the bytes of the location's index.json, local or remote (a run's resume key)."""
    return hashlib.sha256(_read_bytes(_join(location(shard_dir), INDEX_FILE), "did the shard stage run?")).hexdigest()


def _parse_folds(path: Path | str) -> dict[str, list[str]]:
    folds = _read_json(path, "did the shard stage run?")
    if not isinstance(folds, dict) or not all(
        isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in folds.values()
    ):
        raise StageError(f"{path}: not a folds file ({{fold: [image_id, ...]}})")
    return folds


def read_index(shard_dir: Path | str) -> dict[str, Any]:
    path = _join(location(shard_dir), INDEX_FILE)
    index = _read_json(path, "did the shard stage run?")
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("splits"), dict):
        raise StageError(f"{path}: not a shard index of format {INDEX_FORMAT}")
    return index


def _entry(index: dict[str, Any], shard_dir: Path | str, split: str, kind: str) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    splits = index["splits"]
    if split not in splits:
        raise StageError(f"{_join(location(shard_dir), INDEX_FILE)}: no split {split!r} (have {sorted(splits)})")
    return splits[split][kind]


def shard_counts(shard_dir: Path | str, split: str, kind: str) -> dict[str, int]:
    """{shard: the samples index.json counts in it} of one split and kind ("gallery" or "queries"), in
    order; a shard is an absolute path (local location) or a URL (the location's URL + its file name)."""
    where = location(shard_dir)
    entry = _entry(read_index(where), where, split, kind)
    if is_url(where):
        return {_join(where, shard["file"]): shard["count"] for shard in entry["shards"]}
    return {os.path.abspath(where / shard["file"]): shard["count"] for shard in entry["shards"]}


def shard_paths(shard_dir: Path | str, split: str, kind: str) -> list[str]:
    """Absolute paths (or URLs, for a URL location) of the shards of one split and kind, in order."""
    return list(shard_counts(shard_dir, split, kind))


def read_folds(shard_dir: Path | str) -> dict[str, list[str]] | None:
    """The dataset's folds.json ({fold: [image_id, ...]}, COCO 1K) if the shards carry one, else None."""
    where = location(shard_dir)
    entry = read_index(where).get("folds")
    return None if entry is None else _parse_folds(_join(where, entry["file"]))


def read_evaluation(shard_dir: Path | str) -> dict | None:
    """The dataset's evaluation declaration if the shards carry one, else None."""
    where = location(shard_dir)
    entry = read_index(where).get("evaluation")
    if entry is None:
        return None
    return _read_json(_join(where, entry["file"]), "did the shard stage run?")


def verify(shard_dir: Path | str) -> None:
    """Recompute the sha256 of every shard (and of folds.json) and compare it with the index; raise
    naming the first bad file. For a URL location every file is downloaded (streamed) once."""
    where = location(shard_dir)
    index = read_index(where)
    checked = [(shard, "shard")
               for kinds in index["splits"].values() for kind in KINDS for shard in kinds[kind]["shards"]]
    for extra in ("folds", "evaluation"):
        if extra in index:
            checked.append((index[extra], "file"))
    for entry, what in checked:
        path = _join(where, entry["file"])
        try:
            digest = file_sha256(path)
        except (OSError, ImportError, ValueError) as err:  # ImportError: no s3fs etc.; ValueError: unknown protocol
            raise StageError(f"{path}: {what} listed in {INDEX_FILE} is {_unreadable(err)}") from None
        if digest != entry["sha256"]:
            raise StageError(f"{path}: sha256 differs from {INDEX_FILE} (corrupt or modified {what})")


class ShardErrors:
    """WebDataset's exception handler for our readers: a shard that cannot be opened or read (an HTTP
    404, a refused connection, a cut tar stream) is a StageError naming it, not WebDataset's bare
    exception (curl's "exit 22", tarfile's "empty file") with the URL somewhere in its args."""

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, StageError):
            raise exn
        shard = next((a for a in reversed(exn.args) if isinstance(a, str) and (is_url(a) or a.endswith(".tar"))),
                     getattr(exn, "filename", None))
        if shard is None:
            raise exn
        raise StageError(f"{shard}: shard listed in {INDEX_FILE} is {_why_unreadable(str(shard), exn)}") from exn


def _why_unreadable(shard: str, exn: Exception) -> str:
    """For a URL, ask fsspec once whether it is there: curl -f only says "exit 22" for any HTTP error."""
    if isinstance(exn, FileNotFoundError):
        return "missing"
    if is_url(shard) and not shard.lower().startswith("file:"):
        try:
            with _open_url(shard) as f:
                f.read(1)
        except (OSError, ImportError, ValueError) as err:
            return _unreadable(err)
    return f"unreadable ({type(exn).__name__}: {exn.args[0] if exn.args else exn})"


class _CheckCounts:
    """A WebDataset stage that passes samples on and, when a shard's samples are over (the next shard
    begins, or the stream ends), checks their number against the index: a tar stream cut at a member
    boundary reads as a short shard, not as an error. `complete`: the stream holds every shard of
    `counts` (no node or worker split), so a shard that gave no sample at all is an error too."""

    def __init__(self, counts: dict[str, int], complete: bool):
        self.counts, self.complete = counts, complete

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        shard, n, seen = None, 0, set()
        for sample in samples:
            if sample["__url__"] != shard:
                self._check(shard, n)
                shard, n = sample["__url__"], 0
                seen.add(shard)
            n += 1
            yield sample
        self._check(shard, n)
        if self.complete:
            for unseen in (s for s, count in self.counts.items() if count and s not in seen):
                self._check(unseen, 0)

    def _check(self, shard: str | None, n: int) -> None:
        if shard is not None and shard in self.counts and n != self.counts[shard]:
            raise StageError(f"{shard}: read {n} samples where {INDEX_FILE} counts {self.counts[shard]} "
                             f"(a truncated or modified shard)")


def open_shards(counts: dict[str, int], complete: bool = False, **kwargs: Any) -> wds.WebDataset:
    """wds.WebDataset(list(counts), **kwargs) (`counts` as `shard_counts` gives it) that raises a
    StageError naming the shard when one cannot be read or holds other than its indexed count."""
    return wds.WebDataset(list(counts), handler=ShardErrors(), **kwargs).compose(_CheckCounts(counts, complete))


def _raw_samples(counts: dict[str, int], select_files: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Undecoded samples of the shards of `counts` in order: every shard, whatever the node or DataLoader
    worker; only the members whose name passes `select_files` (None = all) are read."""
    if not counts:
        return iter(())
    return iter(open_shards(counts, complete=True, shardshuffle=False, nodesplitter=None, workersplitter=None,
                            empty_check=False, select_files=select_files))


def _is_json(name: str) -> bool:
    return name.endswith(".json")


def image_member(sample: dict[str, Any], prefix: str = "") -> bytes:
    names = [f"{prefix}{ext}" for ext in sorted(set(IMAGE_EXTENSIONS.values())) if f"{prefix}{ext}" in sample]
    if len(names) != 1:
        raise StageError(f"{sample.get('__url__')}: sample {sample['__key__']!r} has no single {prefix}png|jpg image")
    return sample[names[0]]


def iter_gallery(shard_dir: Path | str, split: str) -> Iterator[tuple[str, str, bytes]]:
    """(image_id, caption, image file bytes) of every gallery image of a split, in shard order."""
    for sample in _raw_samples(shard_counts(shard_dir, split, "gallery")):
        meta = json.loads(sample["json"])
        yield meta["image_id"], meta["caption"], image_member(sample)


def iter_queries(shard_dir: Path | str, split: str) -> Iterator[dict[str, Any]]:
    """Every query of a split, in shard order: query_id, reference_id, target_id, text, ref, tgt (bytes)."""
    for sample in _raw_samples(shard_counts(shard_dir, split, "queries")):
        meta = json.loads(sample["json"])
        yield {**meta, "ref": image_member(sample, "ref."), "tgt": image_member(sample, "tgt.")}


def iter_captions(shard_dir: Path | str, split: str) -> Iterator[tuple[str, str, str]]:
    """(caption_id, image_id, text) of every caption of every gallery image of a split, in shard
    order (an image's captions in captions.parquet order). Image bytes are not read."""
    for sample in _raw_samples(shard_counts(shard_dir, split, "gallery"), select_files=_is_json):
        meta = json.loads(sample["json"])
        for caption in sample_captions(meta):
            yield caption["caption_id"], meta["image_id"], caption["text"]
