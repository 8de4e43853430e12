"""Released recipes: each method trained as its released code trains it, selected with one switch.

    python -m pipelines.repro --recipe tirg_lastconv_ga [--set pretrain.steps=520]
    python -m pipelines.recipes                       # the recipes, one line each
    python -m pipelines.recipes tirg --dvc            # the same as `dvc exp run -S ...` flags

A recipe is pipelines/recipes/<name>.yaml: a `description` and `params`, a mapping of params.yaml keys (dotted) to
values. It is applied as DVC param overrides (`dvc exp run -S key=value`), under any `--set` given beside it; it
never edits params.yaml. docs/recipes.md lists, per recipe, what the release does, what cirflow does, and every
deviation that remains. In a sweep grid an option `{recipe: NAME, other.key: value}` expands to the recipe's params.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from pipelines.common import param_value
from pipelines.repro import flatten

RECIPES = Path(__file__).resolve().parent / "recipes"


def names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load(name: str, params_file: Path = Path("params.yaml")) -> tuple[str, dict[str, str]]:
    """(description, {key: value as DVC -S text}) of recipe `name`; every key must be a params.yaml knob."""
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"recipe {name!r}: no {path.relative_to(RECIPES.parents[1])}; recipes: {', '.join(names())}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or "description" not in raw:
        raise ValueError(f"{path}: expected `description` and a `params` mapping of key -> value")
    known = set(flatten(yaml.safe_load(Path(params_file).read_text())))
    unknown = [key for key in raw["params"] if key not in known]
    if unknown:
        raise ValueError(f"{path}: {unknown[0]!r} is not a key of {params_file}")
    return str(raw["description"]), {key: param_value(value) for key, value in raw["params"].items()}


def overrides(name: str | None, sets: list[str] | None, params_file: Path = Path("params.yaml")) -> list[str]:
    """`key=value` overrides: the recipe's, then `sets` (which win)."""
    recipe = [f"{k}={v}" for k, v in load(name, params_file)[1].items()] if name else []
    return recipe + list(sets or [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a recipe; without it, every recipe is listed")
    parser.add_argument("--dvc", action="store_true", help="print the recipe as `dvc exp run -S ...`")
    args = parser.parse_args(argv)
    if args.name is None:
        for name in names():
            print(f"{name:<18} {load(name)[0]}")
        return
    description, params = load(args.name)
    if args.dvc:
        print("dvc exp run " + " ".join(f"-S '{k}={v}'" for k, v in params.items()))
    else:
        print(description)
        for key, value in params.items():
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
