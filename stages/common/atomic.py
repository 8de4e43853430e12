"""Atomic outputs: a reader never sees a half-written file or directory.

Files are written to a hidden temp name beside the target and renamed into place; whole output
directories are built in a `.partial` sibling and swapped in only when complete. A crashed run
leaves nothing under the real output name that a later stage could trust.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path to write; on success rename it to `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path | str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def partial_dir(out: Path | str, key: str) -> Path:
    """Where `staged_dir(out, key)` builds its work; files kept there let a crashed run resume."""
    out = Path(out)
    return out.parent / f".{out.name}.partial-{key}"


@contextmanager
def staged_dir(out: Path | str, resume_key: str | None = None) -> Iterator[Path]:
    """Build directory `out` aside and move it into place only when the block succeeds.

    With a `resume_key` (a hash of everything the output depends on) a failed run keeps its work
    directory, and the next run with the same key continues in it: the stage skips the files that
    are already there (each one was itself written atomically). Without a key, failures clean up.
    """
    out = Path(out)
    work = partial_dir(out, resume_key or f"pid{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException:
        if resume_key is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(work, out)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # work dirs of older params
        shutil.rmtree(stale, ignore_errors=True)
