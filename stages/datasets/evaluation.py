"""How a dataset is evaluated, as its adapter declares it, carried with the data.

Each adapter module has `EVALUATION`: the splits scored, the composed-retrieval protocols (none: an image-text
matching dataset, so `task: auto` reads the task from it too), the recall levels, the WHM reading its papers use and
the split, if any, that training validates on (`pretrain.validation_split: auto`). `prepare` writes it as evaluation.json, `resize` and `shard` pass it on, and
`evaluate`'s params that say `auto` (splits, protocols, ks, whm.definition, whm.weights) read it from the shards,
so `dvc exp run -S dataset.name=css3d` scores CSS3D as CSS3D is scored, with no other switch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.common.atomic import write_json
from stages.common.errors import StageError

EVALUATION_FILE = "evaluation.json"


@dataclass(frozen=True)
class Evaluation:
    splits: tuple[str, ...]
    protocols: tuple[str, ...] = ()  # composed retrieval; () for an image-text matching dataset
    ks: tuple[int, ...] = (1, 5, 10, 50)
    whm_definition: str = "recall_levels"  # splits: (seen, unseen), needs two splits | recall_levels: per split
    whm_weights: tuple[float, ...] | None = None  # recall_levels: one per k; None = all 1
    validation: str | None = None  # the split that eval_every / selection score during training; None = none declared

    @property
    def task(self) -> str:
        return "composed" if self.protocols else "matching"

    def as_json(self) -> dict:
        out = asdict(self)
        out["whm_weights"] = list(self.whm_weights or [1.0] * len(self.ks))
        out["task"] = self.task
        return out


def write(folder: Path, evaluation: Evaluation) -> None:
    write_json(Path(folder) / EVALUATION_FILE, evaluation.as_json())


def read(path: Path) -> dict:
    """A written declaration; StageError naming the file when it is missing or not one."""
    if not Path(path).is_file():
        raise StageError(f"{path}: no such file; `evaluate` params set to auto read it (written by prepare, passed "
                         f"on by resize and shard: re-run them), or set evaluate.splits / protocols / ks explicitly")
    data = json.loads(Path(path).read_text())
    missing = {"splits", "protocols", "ks", "whm_definition", "whm_weights"} - set(data)
    if missing:
        raise StageError(f"{path}: not an evaluation declaration (missing {sorted(missing)})")
    return {"validation": None, "task": "composed" if data["protocols"] else "matching", **data}  # older files


def declared_in(folder: Path | str) -> dict | None:
    """The declaration a stage's input folder carries (prepare's or resize's output), or None."""
    path = Path(folder) / EVALUATION_FILE
    return read(path) if path.is_file() else None
