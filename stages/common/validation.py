"""Every later stage's params checked when a stage starts, so a bad key fails `dvc repro` in seconds.

DVC runs a graph from its first changed stage on; that stage checks its own params and those of every stage
after it (each stage module's `check_params(path, declared)`, in dvc.yaml's order), before it does any work. A bad
`evaluate` key then stops `prepare` or `pretrain` at once instead of `evaluate` after the training. The checks
only parse: they are not DVC params of the stage that runs them, so they never make it re-run.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

from stages.common.params import PARAMS_FILE


_STAGE_MODULE = re.compile(r"\bpython3?(?:\.\d+)?\s+-m\s+stages\.(\w+)")


def stage_order(params_path: Path | str = PARAMS_FILE) -> list[tuple[str, str | None]]:
    """(stage name, the cirflow stage module its cmd runs, or None) for each stage of the dvc.yaml beside the
    params file, in its order (the graph's order). A stage a user adds (plots, an export) runs no cirflow module."""
    dvc_yaml = Path(params_path).resolve().parent / "dvc.yaml"
    if not dvc_yaml.is_file():
        return []
    order = []
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        cmds = stage.get("cmd", "") if isinstance(stage, dict) else ""
        match = _STAGE_MODULE.search(" ".join(cmds) if isinstance(cmds, list) else str(cmds))
        order.append((name, match.group(1) if match else None))
    return order


def check_from(stage: str, params_path: Path | str = PARAMS_FILE, declared: dict | None = None) -> None:
    """Run `check_params(params_path, declared)` of `stage` and of every cirflow stage after it; raises the first
    ParamsError. `declared` is the dataset's evaluation declaration as far as the calling stage knows it (prepare: its
    adapter's; later stages: the one their input carries): `task: auto` and the other `auto` values resolve from it."""
    order = stage_order(params_path)
    names = [name for name, _ in order]
    later = order[names.index(stage):] if stage in names else [(stage, stage)]
    for _, module_name in later:
        if module_name is not None:
            importlib.import_module(f"stages.{module_name}").check_params(params_path, declared)
