"""A tiny run in-process, without DVC: the tiny repository's params (tiny_repo.TINY, plus changes) through the stage
functions prepare, resize, shard, vocabulary and pretrain, then the index of the test split and evaluate's per-query
results. About ten seconds for the composed default; the `tiny_composed` fixture (conftest.py) builds that one once
per session."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tiny_repo import REPO, TINY, merge

SPLIT = "test"


@dataclass(frozen=True)
class TinyRun:
    root: Path
    params: Path
    shards: Path
    model: Path       # pretrained for the tiny repo's steps (a TIRG unless the changes say otherwise)
    index: Path       # its features of the test split (stages.index.build_index)
    per_query: Path   # evaluate --per-query of it


def write_params(dest: Path, **changes) -> Path:
    """params.yaml of the repository with tiny_repo.TINY and `changes` ({section: {key: value}}) merged in."""
    params = merge(merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY), changes)
    path = dest / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def pretrained(root: Path, params: Path) -> Path:
    """prepare, resize, shard, vocabulary and pretrain of `params` into root/{prepared,resized,shards,vocab,pretrain}."""
    from stages import pretrain
    from stages.prepare import prepare
    from stages.resize import resize
    from stages.shard import shard
    from stages.vocabulary import vocabulary

    prepare(root / "prepared", params)
    resize(root / "prepared", root / "resized", params)
    shard(root / "resized", root / "shards", params)
    vocabulary(root / "shards", root / "vocab", params)
    pretrain.main(["--params", str(params), "--shards", str(root / "shards"), "--vocab", str(root / "vocab"),
                   "--out", str(root / "pretrain")])
    return root / "pretrain" / "model.pt"


def build(root: Path, **changes) -> TinyRun:
    """The run in `root`; `changes` ({section: {key: value}} or {key: value}) go over the tiny params (e.g.
    another dataset)."""
    from stages import evaluate
    from stages.index import build_index

    overrides = dict(changes)
    for section in ("evaluate", "pretrain"):
        overrides[section] = {"device": "cpu", **overrides.get(section, {})}
    params = write_params(root, **overrides)
    pretrained(root, params)
    model = root / "pretrain" / "model.pt"
    build_index(model, root / "shards", [SPLIT], root / "index", 64, torch.device("cpu"))
    evaluate.main(["--params", str(params), "--model", str(model), "--shards", str(root / "shards"),
                   "--out", str(root / "metrics.json"), "--per-query", str(root / "evaluate")])
    return TinyRun(root, params, root / "shards", model, root / "index", root / "evaluate")
