"""The results table of a sweep, read from `dvc exp show`, as Markdown (optionally written into README.md).

    python -m pipelines.report --csv sweeps/shapes_models.csv [--readme README.md] [--marker NAME]
    python -m pipelines.report --csv sweeps/shapes_recipes.csv --compare tirg_lastconv_ga:tirg_lastconv \
        --png docs/figures/shapes_recipes.png --readme README.md --marker recipes

A sweep whose grid has a `seed` axis (`--seed-axis`) and an `arm` axis (`--arm-axis`) is reported per arm: each
metric's mean over the seeds with its 95% confidence interval, then for every `--compare A:B` the paired
difference A − B over the seeds both ran, its interval, and one sentence saying whether the interval excludes
zero; `--png` draws the arms' means and intervals as bars (pipelines/stats.py has the arithmetic).

Every number comes from the CSV, which the `sweep` flow wrote from `dvc exp show --json` (params.yaml values as
`params.<key>`, metrics/evaluate.json as `evaluate.<key>`: recall of the composed query under the first protocol,
for task matching i2t / t2i recall and rsum; metrics/{pretrain,train}.json for training seconds): a committed CSV
regenerates its tables on any machine. In README.md the table replaces the text between `<!-- sweep-table:begin -->` and
`<!-- sweep-table:end -->` (with --marker NAME: `<!-- sweep-table:NAME:begin -->` ... `:end -->`).
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import yaml

from pipelines.stats import Interval, interval, paired_difference

BEGIN, END = "<!-- sweep-table:begin -->", "<!-- sweep-table:end -->"


def read_rows(csv_path: Path) -> list[dict[str, object]]:
    """The done experiments of a sweep CSV, each cell read back as YAML (numbers, booleans, lists) where it parses."""
    def value(cell: str):
        if cell == "":
            return None
        try:
            return yaml.safe_load(cell)
        except yaml.YAMLError:
            return cell

    with open(csv_path, newline="") as f:
        rows = [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f) if row["status"] == "done"]
    for row in rows:
        if not any(str(key).startswith("evaluate.") for key in row):
            raise SystemExit(f"{csv_path}: experiment {row['experiment']} has no evaluate.* columns: not a CSV of "
                             f"`pipelines.sweep` (which stores every metric as `dvc exp show` has it)")
    return rows


def table(rows: list[dict[str, object]]) -> str:
    """Markdown, one line per experiment: the composed-retrieval or the matching table by the rows' `task`."""
    if rows and is_matching(rows[0]):
        return matching_table(rows)
    return composed_table(rows)


def resolved_name(row: dict[str, object], section: str) -> str:
    """`params.<section>.name` of a row with `auto` read as the stages resolve it: the task's default model or loss."""
    from stages.modeling.factory import DEFAULT_MODELS
    from stages.training.objectives import DEFAULT_LOSSES

    name = str(row.get(f"params.{section}.name"))
    if name != "auto":
        return name
    return (DEFAULT_MODELS if section == "model" else DEFAULT_LOSSES)["matching" if is_matching(row) else "composed"]


def is_matching(row: dict[str, object]) -> bool:
    """An image-text matching experiment: its metrics have no `composed` section (its params may say task: auto)."""
    return row.get("params.task") == "matching" or not any(str(k).startswith("evaluate.composed.") for k in row)


def matching_table(rows: list[dict[str, object]]) -> str:
    """i2t / t2i R@1 and rsum on test and novel, SIAM-re-ranked t2i R@1, training seconds."""
    header = ("| method | test i2t R@1 | test t2i R@1 | test rsum | novel rsum | test t2i R@1 after SIAM "
              "| train s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        loss = str(row.get("params.train.loss_name", "same"))
        loss = resolved_name(row, "loss") if loss in ("same", "None") else loss
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
            else first_protocol(row)
        test, novel, whm = (f"evaluate.composed.{part}.{protocol}" for part in ("test", "novel", "whm"))
        ga = "+".join(name for name in ("adversarial", "isotropic") if row.get(f"params.ga.{name}")) or "—"
        seconds = float(row.get("pretrain.seconds", 0)) + float(row.get("train.seconds", 0))
        cells = [resolved_name(row, "model"), ga,
                 *(_fmt(row.get(f"{test}.r{k}")) for k in (1, 10, 50)),
                 *(_fmt(row.get(f"{novel}.r{k}")) for k in (1, 10, 50)),
                 _fmt(row.get(f"{whm}.r1")), _fmt(row.get(f"{whm}.r10")), f"{seconds:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


SERVED_T2I = "served.test.t2i.r1"
# the metrics of the seeds tables: (column title, key in a row; {protocol} is the first evaluate protocol)
COMPOSED_METRICS = [("test R@1", "evaluate.composed.test.{protocol}.r1"),
                    ("test R@10", "evaluate.composed.test.{protocol}.r10"),
                    ("test R@50", "evaluate.composed.test.{protocol}.r50"),
                    ("novel R@1", "evaluate.composed.novel.{protocol}.r1"),
                    ("novel R@10", "evaluate.composed.novel.{protocol}.r10"),
                    ("novel R@50", "evaluate.composed.novel.{protocol}.r50")]
MATCHING_METRICS = [("test i2t R@1", "evaluate.test.all.i2t.r1"), ("test t2i R@1", "evaluate.test.all.t2i.r1"),
                    ("test rsum", "evaluate.test.all.rsum"), ("test 1K rsum", "evaluate.test.folds_average.rsum"),
                    ("novel rsum", "evaluate.novel.all.rsum"),
                    ("test t2i R@1 after SIAM", "evaluate.test.siam_reranked.t2i.r1"),
                    ("test t2i R@1 as ranked", SERVED_T2I)]
# what a user of the arm gets: SIAM's re-ranked t2i where the arm has SIAM, else the dual encoder's (SIAM − DE)


def with_served(row: dict[str, object]) -> dict[str, object]:
    reranked = row.get("evaluate.test.siam_reranked.t2i.r1")
    return {**row, SERVED_T2I: reranked if reranked is not None else row.get("evaluate.test.all.t2i.r1")}


def metric_keys(rows: list[dict[str, object]]) -> list[tuple[str, str]]:
    if rows and is_matching(rows[0]):
        return [(title, key) for title, key in MATCHING_METRICS if any(key in row for row in rows)]
    protocols = rows[0].get("params.evaluate.protocols") if rows else None
    protocol = protocols[0] if isinstance(protocols, list) else first_protocol(rows[0] if rows else {})
    return [(title, key.format(protocol=protocol)) for title, key in COMPOSED_METRICS]


def first_protocol(row: dict[str, object]) -> str:
    """The protocol of a composed row's first `evaluate.composed.<split>.<protocol>.r1` (evaluate.protocols auto)."""
    for key in row:
        found = re.fullmatch(r"evaluate\.composed\.(?!harmonic|whm)[^.]+\.([^.]+)\.r1", str(key))
        if found:
            return found.group(1)
    return "target"


def by_arm(sweep_rows: list[dict[str, str]], found: dict[str, dict], arm_axis: str, seed_axis: str
           ) -> dict[str, dict[str, dict[str, object]]]:
    """{arm: {seed: experiment row}} in the CSV's order of arms."""
    arms: dict[str, dict[str, dict[str, object]]] = {}
    for row in sweep_rows:
        for axis in (arm_axis, seed_axis):
            if axis not in row:
                raise SystemExit(f"the sweep CSV has no {axis!r} column (a grid axis of that name)")
        arms.setdefault(row[arm_axis], {})[row[seed_axis]] = with_served(found[row["experiment"]])
    return arms


def seeds_table(arms: dict[str, dict[str, dict[str, object]]], keys: list[tuple[str, str]]) -> str:
    header = "| arm | seeds | " + " | ".join(title for title, _ in keys) + " | train s |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for arm, seeds in arms.items():
        cells = [str(arm), str(len(seeds))]
        for _, key in keys:
            values = [float(row[key]) for row in seeds.values() if row.get(key) is not None]
            cells.append(interval(values).text() if values else "n/a")
        seconds = [float(row.get("pretrain.seconds", 0)) + float(row.get("train.seconds", 0)) for row in seeds.values()]
        cells.append(f"{sum(seconds) / len(seconds):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences(arms: dict[str, dict[str, dict[str, object]]], keys: list[tuple[str, str]],
                pairs: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Interval]]:
    out = {}
    for a, b in pairs:
        for arm in (a, b):
            if arm not in arms:
                raise SystemExit(f"--compare {a}:{b}: no arm {arm!r} in the sweep (arms: {', '.join(arms)})")
        out[(a, b)] = {title: paired_difference({s: float(r[key]) for s, r in arms[a].items() if key in r},
                                                {s: float(r[key]) for s, r in arms[b].items() if key in r})
                       for title, key in keys}
    return out


def differences_table(diffs: dict[tuple[str, str], dict[str, Interval]], keys: list[tuple[str, str]]) -> str:
    header = "| A − B | seeds | " + " | ".join(f"Δ {title}" for title, _ in keys) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for (a, b), by_metric in diffs.items():
        n = min(d.n for d in by_metric.values())
        cells = [f"{a} − {b}", str(n)] + [
            by_metric[title].text(signed=True) + (" *" if by_metric[title].excludes_zero() else "") for title, _ in keys]
        lines.append("| " + " | ".join(cells) + " |")
    starred = any(d.excludes_zero() for by_metric in diffs.values() for d in by_metric.values())
    return "\n".join(lines) + ("\n\n* the 95% interval of the paired difference excludes zero." if starred else "")


def verdicts(diffs: dict[tuple[str, str], dict[str, Interval]], metrics: tuple[str, ...]) -> str:
    """One plain sentence per comparison and headline metric."""
    lines = []
    for (a, b), by_metric in diffs.items():
        parts = []
        for title in metrics:
            d = by_metric.get(title)
            if d is None:
                continue
            if d.n < 2:
                parts.append(f"{title} {d.text(signed=True)} from one seed, no interval")
            elif d.excludes_zero():
                word = "higher" if d.mean > 0 else "lower"
                parts.append(f"{title} {d.text(signed=True)}: {a} is {word}, the interval excludes zero")
            else:
                parts.append(f"{title} {d.text(signed=True)}: the interval includes zero, no difference is shown")
        n = min(d.n for d in by_metric.values())
        lines.append(f"- {a} vs {b} ({n} seed{'s' if n != 1 else ''}): " + "; ".join(parts) + ".")
    return "\n".join(lines)


def draw(arms: dict[str, dict[str, dict[str, object]]], keys: list[tuple[str, str]], path: Path) -> None:
    """Bars: each arm's mean of the first and fourth metric (test / novel R@1; matching: the first two), 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.common.atomic import atomic_path

    shown = [keys[0], keys[3]] if len(keys) > 3 else keys[:2]
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(arms), 3.6), dpi=120)
    for j, (title, key) in enumerate(shown):
        stats_ = [interval([float(r[key]) for r in seeds.values() if key in r]) for seeds in arms.values()]
        xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(arms))]
        errors = [0 if s.n < 2 else s.half_width for s in stats_]
        ax.bar(xs, [s.mean for s in stats_], width, yerr=errors, capsize=3, label=title)
    ax.set_xticks(range(len(arms)), list(arms), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("recall %" if "R@" in shown[0][0] else shown[0][0])
    ax.set_title("mean over seeds, 95% confidence interval", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


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
    parser.add_argument("--csv", type=Path, required=True, action="append", help="a sweep CSV (repeatable: the rows of all)")
    parser.add_argument("--readme", type=Path, help="write the table into this file between the markers")
    parser.add_argument("--marker", help="the README markers' name (default: the unnamed pair)")
    parser.add_argument("--arm-axis", default="arm", help="the grid axis naming the arms (default: arm)")
    parser.add_argument("--seed-axis", default="seed", help="the grid axis naming the seeds (default: seed)")
    parser.add_argument("--compare", action="append", default=[], metavar="A:B",
                        help="report the paired difference arm A − arm B (repeatable; seeds mode)")
    parser.add_argument("--png", type=Path, help="seeds mode: draw the arms' means and intervals here")
    args = parser.parse_args(argv)
    sweep_rows = [row for path in args.csv for row in read_rows(path)]
    found = {row["experiment"]: row for row in sweep_rows}
    if sweep_rows and args.seed_axis in sweep_rows[0]:
        arms = by_arm(sweep_rows, found, args.arm_axis, args.seed_axis)
        keys = metric_keys([row for seeds in arms.values() for row in seeds.values()])
        markdown = seeds_table(arms, keys)
        pairs = [tuple(item.split(":", 1)) for item in args.compare]
        if any(len(p) != 2 for p in pairs):
            raise SystemExit("--compare takes A:B")
        if pairs:
            diffs = differences(arms, keys, pairs)
            headline = tuple(title for title, _ in keys
                             if title in ("test R@1", "novel R@1", "test rsum", "test t2i R@1 as ranked"))
            markdown += "\n\n" + differences_table(diffs, keys) + "\n\n" + verdicts(diffs, headline)
        if args.png:
            draw(arms, keys, args.png)
    else:
        markdown = table([found[row["experiment"]] for row in sweep_rows])
    print(markdown)
    if args.readme:
        write_into_readme(args.readme, markdown, args.marker)


if __name__ == "__main__":
    main()
