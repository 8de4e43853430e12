"""Validation recall during training, and checkpoint selection by it: `eval_every`, `selection` and
`validation_split` of `pretrain` and `train`.

Every `eval_every` steps (and at the last step) the loop (stages.training.loop.fit) scores the weights on the
validation split and logs each score as a dvclive metric, so `dvc plots show` draws when a model stops improving.
With `selection` other than `last` it keeps the weights with the best score of that name.

Composed retrieval: recall@K of the composed query on the split's own gallery under the dataset's first declared
protocol, at the declared K's (those the gallery allows): `val_r1`, `val_r5`, `val_r10`, `val_r50` and
`val_r10_r50` (R@10 + R@50, the sum AMC's train.py keeps its best epoch by).
Image-text matching: i2t / t2i R@K (`val_i2t_r1`, ...), `val_rsum` (R@1+5+10 of both directions) and
`val_r1_r5` (R@1+5 of both directions: AOQ's trainAOQ.py, sunnychencool/AOQ@5bfe620, keeps the best of it).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from stages.common.params import PARAMS_FILE, ParamsError
from stages.retrieval.embedding import embed_gallery, embed_matching_split, embed_queries
from stages.retrieval.matching_metrics import i2t_t2i
from stages.retrieval.protocols import score
from stages.shards import store

COMPOSED_SELECTIONS = ("val_r1", "val_r5", "val_r10", "val_r50", "val_r10_r50")
MATCHING_SELECTIONS = ("val_rsum", "val_r1_r5")
SELECTIONS = ("last", *COMPOSED_SELECTIONS, *MATCHING_SELECTIONS)
MATCHING_KS = (1, 5, 10)
BATCH_SIZE = 256
AUTO = "auto"

Scores = dict[str, float]


def check_selection(selection: str, task: str, section: str) -> None:
    """A ParamsError naming `<section>.selection` when its metric is not one this task's validation reports."""
    allowed = COMPOSED_SELECTIONS if task == "composed" else MATCHING_SELECTIONS
    if selection != "last" and selection not in allowed:
        raise ParamsError(f"{PARAMS_FILE}: {section}.selection: {selection} is not a {task} validation metric; "
                          f"use last or one of {', '.join(allowed)}")


def validation_split(cfg, declared: dict | None, shard_dir: Path | str, section: str) -> str | None:
    """The split that `cfg.validation_split` names (auto: the dataset's declared one; None when it declares none, or
    the shards were built without it, and nothing needs one); a ParamsError when the selection needs a split there is
    not, or the shards lack a split named explicitly."""
    split = cfg.validation_split
    if split == AUTO:
        split = (declared or {}).get("validation")
        if split is not None and split not in store.read_index(shard_dir)["splits"] and cfg.selection == "last":
            return None  # declared but not built (dataset.shapes.val_queries 0): nothing needs it
        if split is None and cfg.selection == "last":
            return None
        if split is None:
            raise ParamsError(f"{PARAMS_FILE}: {section}.validation_split: auto, but the dataset declares no "
                              f"validation split for selection {cfg.selection}; name one of the shards' splits (the "
                              f"releases of some methods select on test: say so if you do), or select last")
    if split not in store.read_index(shard_dir)["splits"]:
        raise ParamsError(f"{PARAMS_FILE}: {section}.validation_split: {shard_dir} has no split {split!r}"
                          + (" (dataset.shapes.val_queries is 0?)" if split == "val" else ""))
    return split


def validator(cfg, task: str, section: str, tokenizer, shard_dir: Path | str, device,
              declared: dict | None) -> Callable[[nn.Module], Scores] | None:
    """model -> {metric: score} on the validation split, or None when `cfg` asks for no validation (eval_every 0)
    or, with validation_split auto and selection last, the dataset declares no validation split (said on stdout)."""
    if cfg.eval_every == 0:
        return None
    check_selection(cfg.selection, task, section)
    split = validation_split(cfg, declared, shard_dir, section)
    if split is None:
        print(f"{section}: no validation recall: the shards hold no validation split the dataset declares "
              f"({section}.validation_split: auto); name one to log it every {cfg.eval_every} steps")
        return None
    if task == "matching":
        return lambda model: matching_scores(model, tokenizer, shard_dir, split, device)
    protocol, ks = composed_protocol(declared, shard_dir, split)
    available = composed_names(ks)
    if cfg.selection != "last" and cfg.selection not in available:
        raise ParamsError(f"{PARAMS_FILE}: {section}.selection: {cfg.selection} needs recall at "
                          f"{cfg.selection.removeprefix('val_').replace('_', ' and ')}, the dataset declares "
                          f"K = {list(ks)} for split {split!r} ({', '.join(available)} available)")
    return lambda model: composed_scores(model, tokenizer, shard_dir, split, protocol, ks, device)


def composed_protocol(declared: dict | None, shard_dir: Path | str, split: str) -> tuple[str, list[int]]:
    """(the dataset's first protocol, the declared K's that the split's gallery allows)."""
    if not declared or not declared.get("protocols"):
        raise ParamsError(f"{shard_dir}: composed validation scores the dataset's declared protocol, and these shards "
                          f"carry no composed-retrieval declaration (evaluation.json): re-run prepare, resize, shard")
    gallery = store.read_index(shard_dir)["splits"][split]["gallery"]["count"]
    return declared["protocols"][0], [k for k in declared["ks"] if k < gallery]


def composed_names(ks: list[int]) -> tuple[str, ...]:
    return (*(f"val_r{k}" for k in ks), *(("val_r10_r50",) if {10, 50} <= set(ks) else ()))


def composed_scores(model: nn.Module, tokenizer, shard_dir, split: str, protocol: str, ks: list[int],
                    device) -> Scores:
    gallery_ids, captions, gallery = embed_gallery(model, shard_dir, split, BATCH_SIZE, device)
    records, queries = embed_queries(model, tokenizer, shard_dir, split, BATCH_SIZE, device)
    result = score(protocol, gallery_ids, captions, gallery, records, queries["composed"], ks, device=device)
    recalls = result.get("average", result)  # the FashionIQ protocols report per category and their average
    scores = {f"val_r{k}": float(recalls[f"r{k}"]) for k in ks}
    if "val_r10" in scores and "val_r50" in scores:
        scores["val_r10_r50"] = scores["val_r10"] + scores["val_r50"]
    return scores


def matching_scores(model: nn.Module, tokenizer, shard_dir, split: str, device) -> Scores:
    _, images, _, texts, text_image = embed_matching_split(model, tokenizer, shard_dir, split, BATCH_SIZE, device)
    metrics = i2t_t2i(images, texts, text_image, MATCHING_KS)
    scores = {f"val_{direction}_r{k}": float(metrics[direction][f"r{k}"])
              for direction in ("i2t", "t2i") for k in MATCHING_KS}
    scores["val_rsum"] = float(metrics["rsum"])
    scores["val_r1_r5"] = sum(scores[f"val_{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5))
    return scores
