"""Small Karpathy split files (DATASETS.md §7, §8 record format) and tiny JPEGs, written by the tests.

No real excerpt of dataset_coco.json / dataset_flickr30k.json exists (only Git-LFS pointers), so the
tests write one in the documented format: {"images": [record, ...], "dataset": name}, records in
Karpathy order with filename, split, sentences [{tokens, raw, imgid, sentid}], sentids, imgid
(+ filepath, cocoid for COCO).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

from PIL import Image

from stages.datasets.download import DownloadConfig

# Downloads in tests: one quick attempt, no backoff.
DOWNLOAD = DownloadConfig(workers=2, retries=0, backoff_seconds=0.0, timeout_seconds=10.0)


def record(imgid: int, filename: str, split: str, raws: list[str], first_sentid: int, **extra) -> dict:
    sentids = list(range(first_sentid, first_sentid + len(raws)))
    sentences = [
        {"tokens": raw.lower().replace(".", "").split(), "raw": raw, "imgid": imgid, "sentid": sentid}
        for raw, sentid in zip(raws, sentids)
    ]
    return {**extra, "sentids": sentids, "filename": filename, "imgid": imgid, "split": split, "sentences": sentences}


def five(subject: str) -> list[str]:
    return [f"{subject} number {n}." for n in range(1, 6)]


def write_karpathy(path: Path, records: list[dict], dataset: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": records, "dataset": dataset}))
    return path


def write_jpeg(path: Path, seed: str) -> Path:
    """An 8x8 JPEG whose colour depends on `seed`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    value = zlib.crc32(seed.encode())
    Image.new("RGB", (8, 8), (value & 255, (value >> 8) & 255, (value >> 16) & 255)).save(path, format="JPEG")
    return path
