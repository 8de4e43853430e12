"""The results table of a sweep, read from `dvc exp show`, as Markdown (optionally written into README.md).

    python -m pipelines.report --csv sweeps/shapes_models.csv [--readme README.md] [--marker NAME] [--root .]

The CSV (written by the `sweep` flow) only names the experiments and their labels; every number comes from
`dvc exp show --json`: params.yaml values, metrics/evaluate.json (recall of the composed query under the
first protocol; for task matching i2t / t2i recall and rsum) and metrics/{pretrain,train}.json (training
seconds). In README.md the table replaces the text between `<!-- sweep-table:begin -->` and
`<!-- sweep-table:end -->` (with --marker NAME: `<!-- sweep-table:NAME:begin -->` ... `:end -->`).
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
    """Markdown, one line per experiment: the composed-retrieval or the matching table by the rows' `task`."""
    if rows and rows[0].get("params.task") == "matching":
        return matching_table(rows)
    return composed_table(rows)


def matching_table(rows: list[dict[str, object]]) -> str:
    """i2t / t2i R@1 and rsum on test and novel, SIAM-re-ranked t2i R@1, training seconds."""
    header = ("| method | test i2t R@1 | test t2i R@1 | test rsum | novel rsum | test t2i R@1 after SIAM "
              "| train s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        loss = str(row["params.loss.name"])
        method = "VSE" if loss == "vse" else f"DE {loss.upper()}"
        method += " + AOQ" if row.get("params.train.offline_negatives") else ""
        method += " + SIAM" if row.get("params.train.siam_steps") else ""
        seconds = sum(float(row.get(key, 0)) for key in ("pretrain.seconds", "train.seconds", "train.siam_seconds"))
        cells = [method, _fmt(row.get("evaluate.test.all.i2t.r1")), _fmt(row.get("evaluate.test.all.t2i.r1")),
                 _fmt(row.get("evaluate.test.all.rsum")), _fmt(row.get("evaluate.novel.all.rsum")),
                 _fmt(row.get("evaluate.test.siam_reranked.t2i.r1")) if row.get("params.train.siam_steps") else "—",
                 f"{seconds:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def composed_table(rows: list[dict[str, object]]) -> str:
    """Recall@1/10/50 on test and novel, WHM, training seconds."""
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


def markers(name: str | None) -> tuple[str, str]:
    return (BEGIN, END) if not name else (f"<!-- sweep-table:{name}:begin -->", f"<!-- sweep-table:{name}:end -->")


def write_into_readme(readme: Path, markdown: str, marker: str | None = None) -> None:
    from stages.common.atomic import atomic_path

    begin, end = markers(marker)
    text = readme.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{readme}: needs the markers {begin} and {end} around the table")
    head, rest = text.split(begin, 1)
    _, tail_text = rest.split(end, 1)
    with atomic_path(readme) as tmp:
        tmp.write_text(f"{head}{begin}\n{markdown}\n{end}{tail_text}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, required=True, help="the sweep's CSV (experiment names)")
    parser.add_argument("--readme", type=Path, help="write the table into this file between the markers")
    parser.add_argument("--marker", help="the README markers' name (default: the unnamed pair)")
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
        write_into_readme(args.readme, markdown, args.marker)


if __name__ == "__main__":
    main()
