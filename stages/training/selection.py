"""Checkpoint selection by validation recall (task matching): the `selection` param of `pretrain` and `train`.

AOQ's trainAOQ.py (sunnychencool/AOQ@5bfe620) validates every `val_step` iterations and keeps the weights with the
best R@1 + R@5 of both directions on the val split (`val_r1_r5`); `val_rsum` adds R@10, the rsum the README tables
report. The loop (stages.training.loop.fit) calls the scorer every `select_every` steps and at the end.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from stages.common.params import PARAMS_FILE, ParamsError
from stages.retrieval.embedding import embed_matching_split
from stages.retrieval.matching_metrics import i2t_t2i
from stages.shards import store

SPLIT = "val"
KS = {"val_rsum": (1, 5, 10), "val_r1_r5": (1, 5)}
BATCH_SIZE = 256


def validator(selection: str, task: str, section: str, tokenizer, shard_dir: Path,
              device) -> Callable[[nn.Module], float] | None:
    """model -> validation score (higher is better) for `selection`; None for "last"."""
    if selection == "last":
        return None
    if task != "matching":
        raise ParamsError(f"{PARAMS_FILE}: {section}.selection: {selection} scores image-text matching, "
                          f"task is {task!r}; use last")
    if SPLIT not in store.read_index(shard_dir)["splits"]:
        raise ParamsError(f"{PARAMS_FILE}: {section}.selection: {selection} needs a '{SPLIT}' split in {shard_dir} "
                          f"(shapes_captions, coco and flickr30k have one); use last")
    ks = KS[selection]

    def score(model: nn.Module) -> float:
        _, images, _, texts, text_image = embed_matching_split(model, tokenizer, shard_dir, SPLIT, BATCH_SIZE, device)
        return i2t_t2i(images, texts, text_image, ks)["rsum"]

    return score
