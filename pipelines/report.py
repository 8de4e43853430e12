"""The results table of a sweep, read from `dvc exp show`, as Markdown (optionally written into README.md).

    python -m pipelines.report --csv sweeps/shapes_models.csv [--readme README.md] [--root .]

The CSV (written by the `sweep` flow) only names the experiments and their labels; every number comes from
`dvc exp show --json`: params.yaml values, metrics/evaluate.json (recall of the composed query under the
first protocol) and metrics/{pretrain,train}.json (training seconds). In README.md the table replaces the
text between `<!-- sweep-table:begin -->` and `<!-- sweep-table:end -->`.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from pipelines.common import shown_experiments
from pipelines.repro import flatten

BEGIN, END = "<!-- sweep-table:begin -->", "<!-- sweep-table:end -->"


def experiments(root: Path, names: set[str]) -> dict[str, dict[str, object]]:
    """{experiment name: flattened params (params.yaml) and metrics (by file stem)} from `dvc exp show --json`."""
    found = {}
    for name, data in shown_experiments(root, names).items():
        params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
        row = {f"params.{k}": v for k, v in flatten(params).items()}
        for path, content in (data.get("metrics") or {}).items():
            row.update({f"{Path(path).stem}.{k}": v for k, v in flatten(content.get("data") or {}).items()})
        found[name] = row
    return found


def table(rows: list[dict[str, object]]) -> str:
    """Markdown: one line per experiment, recall@1/10/50 on test and novel, WHM, training seconds."""
    header = ("| model | GA | test R@1 | test R@10 | test R@50 | novel R@1 | novel R@10 | novel R@50 "
              "| WHM R@1 | WHM R@10 | train s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        protocol = row["params.evaluate.protocols"][0] if isinstance(row.get("params.evaluate.protocols"), list) \
            else "target"
        test, novel, whm = (f"evaluate.composed.{part}.{protocol}" for part in ("test", "novel", "whm"))
        ga = "+".join(name for name in ("adversarial", "isotropic") if row.get(f"params.ga.{name}")) or "—"
        seconds = float(row.get("pretrain.seconds", 0)) + float(row.get("train.seconds", 0))
        cells = [row["params.model.name"], ga,
                 *(_fmt(row.get(f"{test}.r{k}")) for k in (1, 10, 50)),
                 *(_fmt(row.get(f"{novel}.r{k}")) for k in (1, 10, 50)),
                 _fmt(row.get(f"{whm}.r1")), _fmt(row.get(f"{whm}.r10")), f"{seconds:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{float(value):.1f}"


def write_into_readme(readme: Path, markdown: str) -> None:
    from stages.atomic import atomic_path

    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: needs the markers {BEGIN} and {END} around the table")
    head, rest = text.split(BEGIN, 1)
    _, tail_text = rest.split(END, 1)
    with atomic_path(readme) as tmp:
        tmp.write_text(f"{head}{BEGIN}\n{markdown}\n{END}{tail_text}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, required=True, help="the sweep's CSV (experiment names)")
    parser.add_argument("--readme", type=Path, help="write the table into this file between the markers")
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    with open(args.csv, newline="") as f:
        sweep_rows = [row for row in csv.DictReader(f) if row["status"] == "done"]
    found = experiments(args.root, {row["experiment"] for row in sweep_rows})
    missing = [row["experiment"] for row in sweep_rows if row["experiment"] not in found]
    if missing:
        raise SystemExit(f"{args.csv}: experiments not in `dvc exp show`: {missing}")
    markdown = table([found[row["experiment"]] for row in sweep_rows])
    print(markdown)
    if args.readme:
        write_into_readme(args.readme, markdown)


if __name__ == "__main__":
    main()
