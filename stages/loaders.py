"""Tensors from the WebDataset shards: shuffled training batches and ordered evaluation batches."""
from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2

from stages import shards
from stages.vocab import Vocab

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def decode_image(data: bytes) -> torch.Tensor:
    """Image file bytes -> normalised 3 x H x W float tensor."""
    with Image.open(io.BytesIO(data)) as img:
        return _to_tensor(img.convert("RGB"))


def _query_sample(sample: dict) -> dict:
    meta = sample["json"]
    ref_key = next(k for k in sample if k.startswith("ref."))
    tgt_key = next(k for k in sample if k.startswith("tgt."))
    return {
        "ref": decode_image(sample[ref_key]),
        "tgt": decode_image(sample[tgt_key]),
        "text": meta["text"],
        "query_id": meta["query_id"],
        "target_id": meta["target_id"],
    }


def _collate(samples: list[dict]) -> dict:
    return {
        "ref": torch.stack([s["ref"] for s in samples]),
        "tgt": torch.stack([s["tgt"] for s in samples]),
        "text": [s["text"] for s in samples],
        "query_id": [s["query_id"] for s in samples],
        "target_id": [s["target_id"] for s in samples],
    }


def _epoch_loader(urls: list[str], batch_size: int, shuffle_buffer: int, seed: int, workers: int):
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, nodesplitter=None, empty_check=False)
        .shuffle(shuffle_buffer, seed=seed)
        .decode()  # json only; images stay bytes and are decoded by _query_sample
        .map(_query_sample)
        .batched(batch_size, collation_fn=_collate, partial=False)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=min(workers, len(urls)))


def training_batches(
    shard_dir: Path, split: str, batch_size: int, shuffle_buffer: int, seed: int, workers: int
) -> Iterator[dict]:
    """Endless shuffled query batches; each epoch reshuffles with seed + epoch (reproducible)."""
    urls = shards.shard_paths(shard_dir, split, "queries")
    for epoch in itertools.count():
        yielded = False
        for batch in _epoch_loader(urls, batch_size, shuffle_buffer, seed + epoch, workers):
            yielded = True
            yield batch
        if not yielded:
            raise ValueError(f"{shard_dir}: split '{split}' has fewer queries than one batch of {batch_size}")


def texts(shard_dir: Path, split: str) -> Iterator[str]:
    """Every query text of a split, in shard order."""
    for query in shards.iter_queries(shard_dir, split):
        yield query["text"]


def batched(iterable, size: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
