"""Training queries drawn afresh every iteration, as TIRG's CSS3D loader draws them (google/tirg datasets.py,
reused unchanged by fuxianghuang1/GA@f808df1 datasets.py: CSSDataset.generate_random_query_target).

The release alternates two draws. The first query takes a random modification text, then a random (reference,
target) pair among those that text was written for (get_1st_training_query); the second keeps the reference and
takes another of its texts (get_2nd_training_query). A batch of B therefore holds B/2 references with two edits
each: harder in-batch negatives than a uniform shuffle of the manifest's queries. MIT-States' release loader
draws alike (two targets of one source with different adjectives). Where a reference has a single text the
release would loop for ever; here a new first query is drawn instead.

Batch `step` depends on (seed, rank, step) alone: the same batches for a seed whatever the worker count, a
resumed run goes on with the batch it would have drawn (its stream's state is the next step), and different steps
draw different queries.
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from stages.common import distributed
from stages.common.device import pick_device
from stages.common.errors import StageError
from stages.common.params import PARAMS_FILE, ParamsError
from stages.shards import store
from stages.shards.loaders import (
    Decode,
    _images,
    decode_device,
    decode_image,
    decoded_batch,
    encoded_image,
    matching_batches,
    training_batches,
)
from stages.shards.resumable import StepStream


class PerIterationQueries(Dataset):
    """Item `step` is the batch of training step `step` (the loaders' query-batch layout)."""

    def __init__(self, shard_dir: Path | str, split: str, batch_size: int, seed: int, rank: int = 0,
                 image=decode_image):
        self.batch_size, self.seed, self.rank, self.image = batch_size, seed, rank, image
        self.records, self.images = [], {}
        for query in store.iter_queries(shard_dir, split):
            self.images[query["reference_id"]], self.images[query["target_id"]] = query["ref"], query["tgt"]
            self.records.append({k: query[k] for k in ("query_id", "reference_id", "text", "target_id")})
        if not self.records:
            raise StageError(f"{shard_dir}: split {split!r} has no queries to draw training pairs from")
        self.by_text: dict[str, list[int]] = {}
        self.by_reference: dict[str, list[int]] = {}
        for i, record in enumerate(self.records):
            self.by_text.setdefault(record["text"], []).append(i)
            self.by_reference.setdefault(record["reference_id"], []).append(i)
        self.texts = sorted(self.by_text)

    def __len__(self) -> int:
        return 2**62  # endless: a DataLoader's sampler says which steps are drawn

    def draw(self, step: int) -> list[int]:
        """The record indices of step `step`'s batch: (first, second) queries, two per reference."""
        rng = random.Random(f"{self.seed}:{self.rank}:{step}")
        picked: list[int] = []
        while len(picked) < self.batch_size:
            first = rng.choice(self.by_text[rng.choice(self.texts)])
            picked.append(first)
            if len(picked) == self.batch_size:
                break
            record = self.records[first]
            others = [i for i in self.by_reference[record["reference_id"]] if self.records[i]["text"] != record["text"]]
            if others:
                picked.append(rng.choice(others))
        return picked

    def __getitem__(self, step: int) -> dict:
        records = [self.records[i] for i in self.draw(step)]
        return {
            "ref": _images([self.image(self.images[r["reference_id"]]) for r in records]),
            "tgt": _images([self.image(self.images[r["target_id"]]) for r in records]),
            "text": [r["text"] for r in records],
            "query_id": [r["query_id"] for r in records],
            "target_id": [r["target_id"] for r in records],
        }


def per_iteration_batches(shard_dir: Path | str, split: str, batch_size: int, seed: int, workers: int,
                          steps: int, pin_memory: bool = False, decode_on: torch.device | None = None) -> StepStream:
    """The batches of steps 0..steps-1 (each rank its own draw, `batch_size` per rank); decode_on as
    stages.shards.loaders.training_batches. A restored position (load_state_dict) starts at its step."""
    image = decode_image if decode_on is None else encoded_image
    dataset = PerIterationQueries(shard_dir, split, batch_size, seed, distributed.rank(), image)
    decode = None if decode_on is None else functools.partial(decoded_batch, device=decode_on)
    return StepStream(dataset, steps, seed, workers, pin_memory, decode)


def check_pair_sampling(cfg, task: str, section: str) -> None:
    """per_iteration draws composed-retrieval queries: a params error naming the key for image-text matching."""
    if task == "matching" and cfg.pair_sampling != "shuffled":
        raise ParamsError(f"{PARAMS_FILE}: {section}.pair_sampling: per_iteration draws composed-retrieval queries; "
                          "task is matching (use shuffled)")


def query_batches(shard_dir: Path | str, task: str, batch_size: int, cfg, pin_memory: bool = False,
                  decode: Decode = "auto"):
    """The train split's batches as the loop section `cfg` (pretrain or train) says, for `fit`: a stream whose
    position a checkpoint saves and a resumed run restores (stages.shards.resumable).
    decode (stages.shards.loaders.decode_device): auto decodes JPEG shards on the GPU when the step runs on
    CUDA (`cfg.device`, the current CUDA device of this process), anything else on the CPU workers."""
    decode_on = decode_device(decode, step_device(cfg.device), shard_dir, "train",
                              "gallery" if task == "matching" else "queries")
    if decode_on is not None and distributed.rank() == 0:
        print(f"training images: JPEG decoded on {decode_on} (torchvision.io.decode_jpeg), batch by batch")
    if task == "matching":
        return matching_batches(shard_dir, "train", batch_size, cfg.shuffle_buffer, cfg.seed, cfg.workers,
                                pin_memory=pin_memory, decode_on=decode_on)
    if cfg.pair_sampling == "per_iteration":
        return per_iteration_batches(shard_dir, "train", batch_size, cfg.seed, cfg.workers, cfg.steps,
                                     pin_memory=pin_memory, decode_on=decode_on)
    return training_batches(shard_dir, "train", batch_size, cfg.shuffle_buffer, cfg.seed, cfg.workers,
                            pin_memory=pin_memory, decode_on=decode_on)


def step_device(name: str) -> torch.device:
    """The device a training step named `name` (auto | cpu | cuda) runs on in this process: on CUDA the current
    device, which stages.common.distributed.start sets to cuda:<local rank>."""
    device = pick_device(name)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
