"""params.yaml -> one typed, validated dataclass per stage section.

Every stage calls `load(Section, "name")` first; a bad value stops it at start with an error that
names the file and the key (`params.yaml: train.lr: Input should be greater than 0`).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
import typing
from typing import Any, TypeVar

import yaml
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

PARAMS_FILE = Path("params.yaml")
T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, plus YAML 1.2's floats without a dot (`1e-06`): `dvc exp run -S` writes
    1e-6 so, and PyYAML alone would read it as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


class ParamsError(ValueError):
    """A section of params.yaml is missing, has an unknown key, a wrong type or an impossible value."""


def section(cls: type[T]) -> type[T]:
    """Decorator for a params section: unknown keys and loose types (e.g. "1" for an int) are errors."""
    return _pydantic_dataclass(config=ConfigDict(extra="forbid", strict=True))(cls)


def require(condition: bool, key: str, message: str) -> None:
    """Cross-field checks in `__post_init__`; raises a ParamsError naming the key."""
    if not condition:
        raise ParamsError(f"{key}: {message}")


def read_yaml(path: Path = PARAMS_FILE) -> dict[str, Any]:
    try:
        raw = yaml.load(Path(path).read_text(), Loader=_Loader)
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run the stage from the repository root)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return raw


def parse(cls: type[T], name: str, raw: Any, path: Path | str = PARAMS_FILE) -> T:
    """Validate one section's raw mapping into `cls`; errors name `path: name.key`."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: section '{name}' must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):  # nested sections: parse them first, so strict mode sees instances
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind) and isinstance(raw.get(field.name), dict):
            raw[field.name] = parse(kind, f"{name}.{field.name}", raw[field.name], path)
    try:
        return cls(**raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"] if p != "__post_init__")
            key = f"{name}.{loc}" if loc else name
            cause = e.get("ctx", {}).get("error")
            if isinstance(cause, ParamsError):  # a `require` in __post_init__ names its own key
                lines.append(f"{path}: {name}.{cause}")
                continue
            msg = "unknown key" if e["type"] == "unexpected_keyword_argument" else e["msg"]
            lines.append(f"{path}: {key}: {msg}")
        raise ParamsError("\n".join(lines)) from None
    except ParamsError as err:
        raise ParamsError(f"{path}: {name}.{err}") from None
    except TypeError as err:  # missing required fields surface as TypeError from the dataclass init
        raise ParamsError(f"{path}: section '{name}': {err}") from None


def load(cls: type[T], name: str, path: Path | str = PARAMS_FILE) -> T:
    """Read section `name` of params.yaml into the dataclass `cls`."""
    raw = read_yaml(Path(path))
    if name not in raw:
        raise ParamsError(f"{path}: missing section '{name}'")
    return parse(cls, name, raw[name], path)


TASKS = ("composed", "matching")
AUTO = "auto"


def read_task(path: Path | str = PARAMS_FILE, declared: dict | None = None) -> str:
    """The top-level `task`: composed (reference image + text -> image), matching (caption <-> image) or auto: the
    task the dataset declares (`declared`: its evaluation declaration, stages.datasets.evaluation, as prepare
    writes it and the shards carry it)."""
    task = read_yaml(Path(path)).get("task")
    if task == AUTO:
        if declared is None:
            raise ParamsError(f"{path}: task: auto reads the dataset's declaration (evaluation.json, written by prepare "
                              f"and carried by resize and shard), which these inputs lack: re-run prepare, resize "
                              f"and shard, or set task to one of {', '.join(TASKS)}")
        return declared_task(declared)
    if task not in TASKS:
        raise ParamsError(f"{path}: task: must be one of {AUTO}, {', '.join(TASKS)}, got {task!r}")
    return task



def declared_task(declared: dict) -> str:
    """The task of a dataset's evaluation declaration: its `task`, or for one written before that key existed,
    composed when it declares composed-retrieval protocols, else matching."""
    return declared.get("task") or ("composed" if declared.get("protocols") else "matching")
