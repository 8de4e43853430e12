"""Every later stage's params checked when a stage starts, so a bad key fails `dvc repro` in seconds.

DVC runs a graph from its first changed stage on; that stage checks its own params and those of every stage
after it (each stage module's `check_params(path)`, in dvc.yaml's order), before it does any work. A bad
`evaluate` key then stops `prepare` or `pretrain` at once instead of `evaluate` after the training. The checks
only parse: they are not DVC params of the stage that runs them, so they never make it re-run.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from stages.common.params import PARAMS_FILE


def stage_order(params_path: Path | str = PARAMS_FILE) -> list[str]:
    """The stages of the dvc.yaml beside the params file, in its order (the graph's order)."""
    dvc_yaml = Path(params_path).resolve().parent / "dvc.yaml"
    return list(yaml.safe_load(dvc_yaml.read_text())["stages"]) if dvc_yaml.is_file() else []


def check_from(stage: str, params_path: Path | str = PARAMS_FILE) -> None:
    """Run `check_params` of `stage` and of every stage after it; raises the first ParamsError."""
    order = stage_order(params_path)
    for name in order[order.index(stage):] if stage in order else [stage]:
        module = importlib.import_module(f"stages.{name}")
        module.check_params(params_path)
