"""The download layer of the real-dataset adapters: parallel, resumable, verified, never endless.

Each `Item` is fetched over http(s) into `<dest>.part` and renamed to `dest` only once its size and
sha256 (when given) check out, so `dest` is either absent or complete. A `.part` left by a crash or a
dropped connection is resumed with a `Range` request. A file already at `dest` is not requested again.

Every item ends with a `Result` whose status is one of
    downloaded  fetched by this call
    cached      already at `dest` and passing the checks; no request was made
    missing     HTTP 404/410: the URL is dead, so it is not retried
    failed      retries exhausted, a checksum/size mismatch, another 4xx, a local disk error
A bad item never raises; `write_report` records the ones that were not ok.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import requests
from pydantic import Field
from tqdm import tqdm
from typing_extensions import Annotated

from stages.common.atomic import write_json
from stages.common.params import section

CHUNK_BYTES = 1 << 20
STATUSES = ("downloaded", "cached", "missing", "failed")
OK_STATUSES = ("downloaded", "cached")
GONE_CODES = (404, 410)
RETRY_CODES = (429,)  # plus every 5xx


@section
class DownloadConfig:
    workers: Annotated[int, Field(gt=0)]
    retries: Annotated[int, Field(ge=0)]
    backoff_seconds: Annotated[float, Field(ge=0)]
    timeout_seconds: Annotated[float, Field(gt=0)]


@dataclass(frozen=True)
class Item:
    url: str
    dest: Path
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Result:
    item: Item
    status: str
    error: str = ""
    bytes: int = 0  # size of the file this call downloaded; 0 unless the status is "downloaded"

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


class _Retryable(Exception):
    """A failure that another attempt may fix: a busy server, a dropped connection, a timeout."""


class _Final(Exception):
    """A failure that retrying will not fix; carries the status to report."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def part_path(dest: Path) -> Path:
    """Where `dest` is downloaded before it is verified and renamed into place."""
    return dest.with_name(dest.name + ".part")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path, item: Item) -> str | None:
    """Why the file at `path` is not the one `item` describes, or None when it passes."""
    size = path.stat().st_size
    if item.size is not None and size != item.size:
        return f"size {size} != expected {item.size}"
    if item.sha256 is not None:
        actual = sha256_of(path)
        if actual != item.sha256.lower():
            return f"sha256 {actual} != expected {item.sha256}"
    return None


def fetch(item: Item, cfg: DownloadConfig, session: requests.Session | None = None) -> Result:
    """Download one item (or find it cached); returns a Result instead of raising for a bad item."""
    if session is None:
        with requests.Session() as own_session:
            return fetch(item, cfg, own_session)
    dest = Path(item.dest)
    try:
        if dest.exists():
            if check_file(dest, item) is None:
                return Result(item, "cached")
            dest.unlink()  # a stale or corrupt copy: fetch it again
        dest.parent.mkdir(parents=True, exist_ok=True)
        return _download_with_retries(item, cfg, session)
    except OSError as err:  # the local disk, not the server: full, read-only, ...
        return Result(item, "failed", f"local file error: {err}")


def _download_with_retries(item: Item, cfg: DownloadConfig, session: requests.Session) -> Result:
    attempts = cfg.retries + 1
    last_error = ""
    for attempt in range(attempts):
        if attempt > 0:
            time.sleep(cfg.backoff_seconds * 2 ** (attempt - 1))
        try:
            _download_to_part(item, cfg, session)
        except _Retryable as err:
            last_error = str(err)
            continue
        except _Final as err:
            return Result(item, err.status, str(err))
        return _verify_and_publish(item)
    return Result(item, "failed", f"gave up after {attempts} attempt(s): {last_error}")


def _verify_and_publish(item: Item) -> Result:
    part = part_path(Path(item.dest))
    problem = check_file(part, item)
    if problem is not None:
        part.unlink()  # a wrong file is never worth resuming
        return Result(item, "failed", problem)
    os.replace(part, item.dest)
    return Result(item, "downloaded", bytes=Path(item.dest).stat().st_size)


def _download_to_part(item: Item, cfg: DownloadConfig, session: requests.Session) -> None:
    """One attempt: resume or start `<dest>.part` and stream the body into it until the end."""
    part = part_path(Path(item.dest))
    offset = part.stat().st_size if part.exists() else 0
    response = _get(item.url, offset, cfg, session)
    try:
        if offset > 0 and response.status_code in (206, 416) and not _continues_at(response, offset):
            if response.status_code == 416 and _part_is_complete(response, offset):
                return  # an earlier attempt had received every byte; verification decides
            # The part does not line up with the server's file: start over, within this attempt.
            response.close()
            part.unlink()
            offset = 0
            response = _get(item.url, 0, cfg, session)
        _raise_for_status(response)
        # 206 continues the part; 200 means the server ignored the Range and sends the whole file.
        _stream_into(response, part, start=offset if response.status_code == 206 else 0)
    finally:
        response.close()


def _get(url: str, offset: int, cfg: DownloadConfig, session: requests.Session) -> requests.Response:
    # identity: a compressed transfer would make the bytes (and the Range offsets) differ from the file's
    headers = {"Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    try:
        return session.get(url, headers=headers, stream=True, timeout=cfg.timeout_seconds)
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _Retryable(f"{type(err).__name__}: {err}") from None
    except requests.RequestException as err:  # a malformed URL, too many redirects, ...
        raise _Final("failed", f"{type(err).__name__}: {err}") from None


def _continues_at(response: requests.Response, offset: int) -> bool:
    """Whether a reply to `Range: bytes=<offset>-` continues our part file exactly where it ends."""
    if response.status_code != 206:
        return False
    start, _ = _parse_content_range(response.headers.get("Content-Range", ""))
    return start == offset


def _part_is_complete(response: requests.Response, offset: int) -> bool:
    """A 416 says the range starts at or past the end; the part is whole when the total equals it."""
    _, total = _parse_content_range(response.headers.get("Content-Range", ""))
    return total is None or total == offset


def _parse_content_range(value: str) -> tuple[int | None, int | None]:
    """`bytes 100-199/200` -> (100, 200); `bytes */200` -> (None, 200); unknown parts are None."""
    unit, _, spec = value.strip().partition(" ")
    if unit != "bytes" or "/" not in spec:
        return None, None
    span, _, total = spec.partition("/")
    start = span.split("-")[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def _raise_for_status(response: requests.Response) -> None:
    code = response.status_code
    if code in (200, 206):
        return
    message = f"HTTP {code} {response.reason or ''}".strip()
    if code in GONE_CODES:
        raise _Final("missing", message)
    if code in RETRY_CODES or code >= 500:
        raise _Retryable(message)
    raise _Final("failed", message)


def _stream_into(response: requests.Response, part: Path, start: int) -> None:
    """Write the body to `part` from byte `start`; what arrives before a dropped connection is kept."""
    with open(part, "ab" if start > 0 else "wb") as f:
        try:
            for chunk in response.iter_content(CHUNK_BYTES):
                f.write(chunk)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            raise _Retryable(f"connection lost after {f.tell()} bytes: {type(err).__name__}") from None
        written = f.tell()
    # urllib3 already enforces Content-Length; this guards any path where a short body slips through.
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and written != start + int(length):
        raise _Retryable(f"connection closed early: {written} of {start + int(length)} bytes")


def fetch_all(items: list[Item], cfg: DownloadConfig, desc: str = "download") -> list[Result]:
    """Fetch every item with `cfg.workers` threads; results come back in the order of `items`."""
    _reject_duplicate_destinations(items)
    began = time.monotonic()
    results: list[Result | None] = [None] * len(items)
    sessions = _ThreadSessions()
    try:
        with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
            def fetch_in_worker(item: Item) -> Result:
                return fetch(item, cfg, sessions.get())

            futures = {pool.submit(fetch_in_worker, item): i for i, item in enumerate(items)}
            for future in tqdm(as_completed(futures), total=len(items), desc=desc, unit="file"):
                results[futures[future]] = future.result()
    finally:
        sessions.close_all()
    done = [r for r in results if r is not None]
    print(summary_line(desc, done, time.monotonic() - began))
    return done


def _reject_duplicate_destinations(items: list[Item]) -> None:
    """Two items writing one file would race on its `.part`; that is a bug in the caller."""
    seen: set[Path] = set()
    for item in items:
        dest = Path(item.dest).resolve()
        if dest in seen:
            raise ValueError(f"two download items share the destination {item.dest}")
        seen.add(dest)


class _ThreadSessions:
    """One requests.Session per worker thread: sessions pool connections but are not thread-safe."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._all.append(session)
        return session

    def close_all(self) -> None:
        for session in self._all:
            session.close()


def count_statuses(results: list[Result]) -> dict[str, int]:
    counts = Counter(r.status for r in results)
    return {status: counts.get(status, 0) for status in STATUSES}


def summary_line(desc: str, results: list[Result], seconds: float) -> str:
    counts = count_statuses(results)
    megabytes = sum(r.bytes for r in results) / 1e6
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    return f"{desc}: {parts}; {megabytes:.1f} MB in {seconds:.1f} s"


def write_report(path: Path, results: list[Result]) -> dict:
    """Write (atomically) and return {"total", "counts": {status: n}, "problems": [...not-ok items]}."""
    report = {
        "total": len(results),
        "counts": count_statuses(results),
        "problems": [
            {"url": r.item.url, "dest": str(r.item.dest), "status": r.status, "error": r.error}
            for r in results if not r.ok
        ],
    }
    write_json(path, report)
    return report
