"""Tensors from the WebDataset shards: shuffled training batches (queries, or image-caption pairs for
image-text matching) and ordered evaluation batches.

Where the training images are decoded (`decode_on` of training_batches / matching_batches):
    None        in the DataLoader workers, by PIL (decode_image): float tensors come out of the loader
    a device    the workers hand on each image's file bytes (1-D uint8 tensors, JPEG only) and the batch is
                decoded at once on that device by torchvision.io.decode_jpeg (nvjpeg on CUDA), then
                normalised there as decode_image does: the CPU workers only read and shuffle
`decode_device` picks it for the stages (pretrain, train through stages.shards.pairs.query_batches).
"""
from __future__ import annotations

import functools
import io
import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2

from stages.common import distributed
from stages.common.errors import StageError
from stages.shards import store
from stages.shards.resumable import DecodedBatches, ResumableStream, stateful_loader

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


JPEG_MAGIC = b"\xff\xd8\xff"
IMAGE_KEYS = ("ref", "tgt", "image")  # the image tensors of a query batch and of an image-caption batch
Decode = Literal["cpu", "cuda", "auto"]


def decode_image(data: bytes) -> torch.Tensor:
    """Image file bytes -> normalised 3 x H x W float tensor."""
    with Image.open(io.BytesIO(data)) as img:
        return _to_tensor(img.convert("RGB"))


def encoded_image(data: bytes) -> torch.Tensor:
    """JPEG file bytes as a 1-D uint8 tensor, left for decode_jpegs to decode with the rest of its batch."""
    if not data.startswith(JPEG_MAGIC):
        raise StageError("decoding on the GPU reads JPEG only, and a shard holds another image format "
                         "(resize.format: jpeg writes JPEG shards; PNG shards decode on the CPU workers)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1))


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A batch of encoded_image tensors -> B x 3 x H x W normalised floats on `device`, equal to stacking
    decode_image of each (torchvision.io.decode_jpeg: one batched nvjpeg call on CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    if len({tuple(image.shape) for image in images}) > 1:
        raise StageError(f"a batch holds images of different sizes ({sorted({tuple(i.shape) for i in images})}): "
                         "the shards come from the resize stage, which gives every image one size")
    mean, std = _normalisation(torch.device(device))
    return torch.stack(images).float().div_(255).sub_(mean).div_(std)


def _images(images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """A batch's images: decoded ones stacked, encoded ones (1-D) as a list for decode_jpegs."""
    return list(images) if images[0].dim() == 1 else torch.stack(images)


def decoded_batch(batch: dict, device: torch.device) -> dict:
    """The batch with its encoded images (lists from workers that read with `encoded_image`) decoded on `device`."""
    return {k: decode_jpegs(v, device) if k in IMAGE_KEYS and isinstance(v, list) else v for k, v in batch.items()}


def _query_sample(sample: dict, image=decode_image) -> dict:
    meta = sample["json"]
    ref_key = next(k for k in sample if k.startswith("ref."))
    tgt_key = next(k for k in sample if k.startswith("tgt."))
    return {
        "ref": image(sample[ref_key]),
        "tgt": image(sample[tgt_key]),
        "text": meta["text"],
        "query_id": meta["query_id"],
        "target_id": meta["target_id"],
    }


def _collate(samples: list[dict]) -> dict:
    return {
        "ref": _images([s["ref"] for s in samples]),
        "tgt": _images([s["tgt"] for s in samples]),
        "text": [s["text"] for s in samples],
        "query_id": [s["query_id"] for s in samples],
        "target_id": [s["target_id"] for s in samples],
    }


def _pairs(samples: Iterator[dict]) -> Iterator[dict]:
    """A pipeline stage: each decoded gallery sample -> one item per caption (image still bytes)."""
    for sample in samples:
        meta, image = sample["json"], store.image_member(sample)
        for caption in store.sample_captions(meta):
            yield {"image": image, "text": caption["text"], "image_id": meta["image_id"],
                   "caption_id": caption["caption_id"]}


def _pair_sample(pair: dict, image=decode_image) -> dict:
    return {**pair, "image": image(pair["image"])}


def _collate_pairs(pairs: list[dict]) -> dict:
    return {
        "image": _images([p["image"] for p in pairs]),
        **{key: [p[key] for p in pairs] for key in ("text", "image_id", "caption_id")},
    }


def _raw_epoch(urls: dict[str, int], batch_size: int, shuffle_buffer: int, seed: int, expand=None):
    """One epoch of the shards `urls` ({shard: indexed count}, store.shard_counts) as lists of undecoded samples:
    shards shuffled, samples (after `expand`, a generator stage, if any) shuffled, grouped into full batches."""
    dataset = (
        store.open_shards(urls, shardshuffle=len(urls), seed=seed, nodesplitter=None, empty_check=False)
        .decode()  # json only; images stay bytes until the batch is finished (decoding before shuffle keeps the order)
    )
    if expand is not None:
        dataset = dataset.compose(expand)
    return dataset.shuffle(shuffle_buffer, seed=seed).batched(batch_size, collation_fn=list, partial=False)


def _raw_resampled(urls: list[str], batch_size: int, shuffle_buffer: int, seed: int, expand=None):
    """An endless stream for one of several training processes: shards drawn with replacement, seeded by
    (rank, DataLoader worker, seed) (wds.ResampledShards, deterministic), so every rank and worker reads
    its own reproducible stream, none runs dry, and all ranks take the same number of equal batches."""
    steps = [wds.ResampledShards(urls, seed=seed, deterministic=True),
             wds.tarfile_to_samples(handler=store.ShardErrors()), wds.decode()]
    if expand is not None:
        steps.append(expand)
    steps += [wds.shuffle(shuffle_buffer, seed=seed), wds.batched(batch_size, collation_fn=list, partial=False)]
    return wds.DataPipeline(*steps)


def _finisher(to_item, collate):
    return lambda samples: collate([to_item(sample) for sample in samples])


def _stream(urls: dict[str, int], batch_size: int, shuffle_buffer: int, seed: int, workers: int, to_item, collate,
            expand, pin_memory: bool, decode_on: torch.device | None, empty: str) -> ResumableStream:
    """Epochs of the shards on one process, an endless resampled stream on several (see _raw_resampled)."""
    finish = _finisher(to_item, collate)
    if distributed.size() > 1:
        def make_loader(s):
            raw = _raw_resampled(list(urls), batch_size, shuffle_buffer, seed, expand)
            return stateful_loader(DecodedBatches(raw, finish), s, workers, pin_memory)
    else:
        def make_loader(s):
            raw = _raw_epoch(urls, batch_size, shuffle_buffer, s, expand)
            return stateful_loader(DecodedBatches(raw, finish), s, min(workers, len(urls)), pin_memory)
    decode = None if decode_on is None else functools.partial(decoded_batch, device=decode_on)
    return ResumableStream(make_loader, seed, empty, decode)


def training_batches(
    shard_dir: Path, split: str, batch_size: int, shuffle_buffer: int, seed: int, workers: int,
    pin_memory: bool = False, decode_on: torch.device | None = None,
) -> ResumableStream:
    """Endless shuffled query batches; each epoch reshuffles with seed + epoch (reproducible). On several
    processes (stages.common.distributed) each rank gets `batch_size` queries per batch from resampled store.
    pin_memory: batches in page-locked memory, for non-blocking copies to the GPU. decode_on: None, the workers
    decode the images; a device, the batch is decoded there (JPEG shards; see the module doc).
    The stream's position is saved and restored with state_dict / load_state_dict (stages.shards.resumable)."""
    urls = store.shard_counts(shard_dir, split, "queries")
    to_item = _query_sample if decode_on is None else functools.partial(_query_sample, image=encoded_image)
    return _stream(urls, batch_size, shuffle_buffer, seed, workers, to_item, _collate, None, pin_memory, decode_on,
                   f"{shard_dir}: split '{split}' has fewer queries than one batch of {batch_size}")


def matching_batches(
    shard_dir: Path, split: str, batch_size: int, shuffle_buffer: int, seed: int, workers: int,
    pin_memory: bool = False, decode_on: torch.device | None = None,
) -> ResumableStream:
    """Endless shuffled batches of (image, caption) pairs for image-text matching: every caption of
    every gallery image of the split is one pair each epoch (an image with 5 captions comes 5 times).
    Keys: image (B x 3 x H x W), text, image_id, caption_id (lists). Each epoch reshuffles with
    seed + epoch (reproducible); pairs that do not fill a last batch are left out of that epoch. On several
    processes (stages.common.distributed) each rank gets `batch_size` pairs per batch from resampled store.
    decode_on and the saved position: as training_batches."""
    urls = store.shard_counts(shard_dir, split, "gallery")
    to_item = _pair_sample if decode_on is None else functools.partial(_pair_sample, image=encoded_image)
    return _stream(urls, batch_size, shuffle_buffer, seed, workers, to_item, _collate_pairs, _pairs, pin_memory,
                   decode_on, f"{shard_dir}: split '{split}' has fewer image-caption pairs than one batch of {batch_size}")


def decode_device(decode: Decode, device: torch.device, shard_dir: Path | str, split: str,
                  kind: str) -> torch.device | None:
    """Where the training images of a split's `kind` shards (queries, gallery) are decoded, for `decode_on`:
    cpu -> None (the loader's CPU workers); cuda -> `device`, which must be a CUDA device, the shards JPEG;
    auto -> `device` when it is a CUDA device and the shards hold JPEG, else None. The shards' format is read
    from the split's first image."""
    if decode == "cpu":
        return None
    if device.type != "cuda":
        if decode == "auto":
            return None
        why = "torch sees no CUDA device" if not torch.cuda.is_available() else f"the step runs on {device}"
        raise StageError(f"decode: cuda decodes the training images on the GPU, but {why} (decode: cpu or auto)")
    first = next(store.iter_queries(shard_dir, split))["ref"] if kind == "queries" else \
        next(store.iter_gallery(shard_dir, split))[2]
    if first.startswith(JPEG_MAGIC):
        return device
    if decode == "auto":
        return None
    raise StageError(f"decode: cuda decodes JPEG only, and {shard_dir} split {split!r} holds another format "
                     "(resize.format: jpeg writes JPEG shards)")


def texts(shard_dir: Path, split: str) -> Iterator[str]:
    """Every query text of a split, in shard order."""
    for query in store.iter_queries(shard_dir, split):
        yield query["text"]


def batched(iterable, size: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
