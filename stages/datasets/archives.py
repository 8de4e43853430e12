"""Download-once and safe extraction of zip and tar archives, for the adapters whose raw data comes
as an archive (CSS3D's CSS.zip, MIT-States' release_dataset.zip, Fashion200k's women.tar.gz).

* `download_and_extract` fetches the archive at a URL into raw_dir and unpacks it there, both once:
  a marker file beside the archive (`.<archive>.extracted.json`) records a finished extraction, and
  while it exists nothing is requested or unpacked again;
* extraction checks every member name before writing anything: a member that would land outside the
  destination (absolute, '..', a link leaving it, a device file) is a StageError;
* members under __MACOSX/ (macOS resource forks) are skipped.
"""
from __future__ import annotations

import json
import shutil
import sys
import tarfile
import urllib.parse
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from stages.common.atomic import atomic_path, write_json
from stages.common.errors import StageError
from stages.datasets.common import safe_relative_path
from stages.datasets.download import DownloadConfig, Item, fetch_all, sha256_of, write_report

JUNK_PARTS = ("__MACOSX",)  # folders of macOS archives that hold no data


def is_junk(name: str) -> bool:
    """True for a path inside a folder of JUNK_PARTS (e.g. `__MACOSX/CSS/._images`)."""
    return any(part in JUNK_PARTS for part in PurePosixPath(name).parts)


def url_file_name(url: str) -> str:
    """The last path segment of `url` (`.../CSS.zip` -> `CSS.zip`)."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    if not name:
        raise StageError(f"{url}: the URL names no file")
    return name


def download_file(url: str, dest: Path, download: DownloadConfig, desc: str) -> None:
    """Fetch `url` to `dest` with stages.datasets.download; a failure is a StageError. The download report
    goes beside `dest` (in raw_dir), so that prepare's output does not depend on the first run."""
    results = fetch_all([Item(url=url, dest=dest)], download, desc=desc)
    write_report(dest.with_name(f".{dest.name}.download.json"), results)
    if not results[0].ok:
        raise StageError(f"{url}: download to {dest} {results[0].status}: {results[0].error}")


def extraction_marker(archive: Path) -> Path:
    """The file whose presence says `archive` was fully extracted; it records what happened."""
    return archive.with_name(f".{archive.name}.extracted.json")


def download_and_extract(url: str, raw_dir: Path, download: DownloadConfig, desc: str) -> dict:
    """Download the archive at `url` into raw_dir and extract it there, both once: when the marker of a
    finished extraction exists nothing is requested or unpacked again. Returns the marker's record."""
    archive = raw_dir / url_file_name(url)
    if not extraction_marker(archive).exists():
        raw_dir.mkdir(parents=True, exist_ok=True)
        download_file(url, archive, download, desc)
    return extract_once(archive, raw_dir, url)


def not_in_archive_hint(url: str, raw_dir: Path) -> str:
    """What to say when data expected from the archive at `url` is not in raw_dir."""
    marker = extraction_marker(raw_dir / url_file_name(url))
    return (f"the archive {url} does not hold it, or its extracted files were removed since "
            f"(delete {marker} to extract the archive again)")


def extract_once(archive: Path, dest: Path, url: str | None = None) -> dict:
    """Extract a zip or a tar(.gz) into `dest` unless its marker says that was done; returns the record
    {archive, url, sha256, members, unreadable_members}. Members under __MACOSX/ are skipped. A zip
    member whose data is corrupt (bad CRC) is skipped and listed: MIT-States' zip is reported partly
    corrupt, and losing a few images should not lose the dataset."""
    marker = extraction_marker(archive)
    if marker.exists():
        return json.loads(marker.read_text())
    print(f"extract {archive} -> {dest}", file=sys.stderr)
    if zipfile.is_zipfile(archive):
        members, unreadable = extract_zip(archive, dest)
    elif tarfile.is_tarfile(archive):
        members, unreadable = extract_tar(archive, dest), []
    else:
        raise StageError(f"{archive}: neither a zip nor a tar archive (a truncated download? delete it to refetch)")
    record = {"archive": archive.name, "url": url, "sha256": sha256_of(archive), "members": members,
              "unreadable_members": unreadable}
    write_json(marker, record)
    return record


def extract_zip(archive: Path, dest: Path) -> tuple[int, list[str]]:
    """Check every member name first (nothing is written when one would leave `dest`), then extract,
    each file atomically. Returns (members extracted, names of the unreadable ones skipped)."""
    with zipfile.ZipFile(archive) as zf:
        infos = [info for info in zf.infolist() if not is_junk(info.filename)]
        for info in infos:
            safe_relative_path(info.filename, f"{archive}: member")
        unreadable = []
        for info in tqdm(infos, desc=f"extract {archive.name}", unit="file", disable=None):
            target = dest / info.filename
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as source, atomic_path(target) as tmp, open(tmp, "wb") as sink:
                    shutil.copyfileobj(source, sink)
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                print(f"extract {archive.name}: skipping unreadable member {info.filename}: {err}", file=sys.stderr)
                unreadable.append(info.filename)
    return len(infos), unreadable


def extract_tar(archive: Path, dest: Path) -> int:
    """tarfile's 'data' filter refuses absolute paths, `..`, links leaving `dest` and device files;
    every member is checked before anything is written. Returns the number of members extracted."""
    try:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if not is_junk(m.name)]
            for member in members:
                tarfile.data_filter(member, str(dest))
            tf.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as err:
        raise StageError(f"{archive}: a member would be written outside {dest}: {err}") from None
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise StageError(f"{archive}: unreadable tar archive ({err}); delete it to refetch") from None
    return len(members)
