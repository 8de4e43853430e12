"""The project files a Python module executes: its import closure, read from the source with ast.

Every `import` / `from ... import` anywhere in a file counts (function-level ones too), every package's
`__init__.py` on the way counts, and so does a module named in a string constant ("stages.datasets.shapes"):
that is how registries load modules by name (importlib.import_module).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "models", "pipelines")


def module_file(name: str) -> Path | None:
    """stages.retrieval.topk -> stages/retrieval/topk.py (or a package's __init__.py); None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_packages(name: str) -> list[Path]:
    """The files that importing `name` executes: each enclosing package's __init__.py, then the module."""
    parts = name.split(".")
    files = [module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
    return [f for f in files if f is not None]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def direct_imports(path: Path) -> set[Path]:
    """The project files one file imports, directly."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[Path] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and module_file(node.value):
            names = [node.value]  # loaded by name
        for name in names:
            found.update(_with_packages(name))
    found.discard(path)
    return found


def closure(module: str) -> set[Path]:
    """Every project file that running `python -m module` executes."""
    todo = _with_packages(module)
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(direct_imports(path) - seen)
    return seen


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    """The files (repository-relative) that no dep names, as a file or a folder above it."""
    covered = [REPO / d for d in deps]
    missing = []
    for f in files:
        if not any(f == d or d in f.parents for d in covered):
            missing.append(f.relative_to(REPO).as_posix())
    return sorted(missing)
