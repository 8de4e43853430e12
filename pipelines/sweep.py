"""Flow `sweep`: every combination of a parameter grid as a DVC experiment, then one results table.

    python -m pipelines.sweep --set train.lr=0.01,0.05 --set train.steps=150,300 [--grid grid.yaml]
                              [--root .] [--out sweeps/<name>.csv]

A grid file maps a param to its values, or an axis name to named options, each a group of params that
change together (e.g. `model: {val: {model.name: val, loss.name: val_matching}, ...}`); the sweep is the
product of all axes. sweeps/shapes_models.yaml is the four-models-with-and-without-GA sweep.

Each combination is one Prefect task running `dvc exp run --temp -n <name> -S ...`, at most
`orchestration.parallel` at a time. (`--temp` runs each experiment in its own temporary copy of the
workspace and needs no queue worker in the background; DVC's `--queue` + celery workers add a
second scheduler with its own state to watch, which Prefect already is.) A failing experiment is
listed as failed with DVC's error; the others still complete. The table is written as CSV and as a Prefect table
artifact: per experiment the grid's labels, then every param (`params.<key>`) and metric (`<metrics file stem>.<key>`,
e.g. `evaluate.composed.test.target.r1`) as `dvc exp show` has them, so that pipelines.report can table a committed
CSV on a machine that never ran the experiments.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import time
from pathlib import Path
from typing import Callable, Union

import yaml
from prefect import flow, task
from prefect.artifacts import create_table_artifact

from pipelines.common import dvc, experiment_rows, load_orchestration, param_value, tail
from pipelines.repro import flatten


Grid = dict[str, Union[list[str], dict[str, dict[str, str]]]]


def _with_recipe(group: dict) -> dict[str, str]:
    """A named option's params; `recipe: NAME` stands for the recipe's params (the option's other keys win)."""
    from pipelines import recipes

    group = dict(group)
    name = group.pop("recipe", None)
    params = recipes.load(name)[1] if name else {}
    return {**params, **{k: param_value(v) for k, v in group.items()}}


def parse_grid(sets: list[str] | None, grid_file: Path | None) -> Grid:
    """{axis: values} from `--set key=v1,v2` items and/or a YAML file. An axis is a param with its
    values, or a name with named options {label: {param: value, ...}}."""
    grid: Grid = {}
    if grid_file is not None:
        raw = yaml.safe_load(Path(grid_file).read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{grid_file}: expected a mapping of param -> list of values")
        for key, values in raw.items():
            if isinstance(values, dict):
                for label, group in values.items():
                    if not isinstance(group, dict) or not group:
                        raise ValueError(f"{grid_file}: {key}.{label}: expected a mapping of param -> value")
                grid[key] = {str(label): _with_recipe(group) for label, group in values.items()}
                continue
            values = values if isinstance(values, list) else [values]
            grid[key] = [param_value(v) for v in values]
    for item in sets or []:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise ValueError(f"--set {item!r}: expected key=value1,value2,...")
        grid[key] = values.split(",")
    if not grid:
        raise ValueError("an empty grid: give --set key=v1,v2 or --grid FILE")
    return grid


def combinations(grid: Grid) -> list[tuple[dict[str, str], dict[str, str]]]:
    """Every point of the grid as (labels of the named-option axes, the params it sets)."""
    axes = []
    for key, options in grid.items():
        if isinstance(options, dict):
            axes.append([({key: label}, group) for label, group in options.items()])
        else:
            axes.append([({}, {key: value}) for value in options])
    points = []
    for choice in itertools.product(*axes):
        labels, assignment = {}, {}
        for label, params in choice:
            labels.update(label)
            assignment.update(params)
        points.append((labels, assignment))
    return points


@task
def run_experiment(root: str, name: str, assignment: dict[str, str], labels: dict[str, str] | None = None) -> dict:
    args = ["exp", "run", "--temp", "--name", name, *(a for k, v in assignment.items() for a in ("-S", f"{k}={v}"))]
    began = time.perf_counter()
    result = dvc(args, Path(root))
    seconds = round(time.perf_counter() - began, 1)
    if result.returncode != 0:
        print(f"{name}: failed after {seconds} s")
        return {"experiment": name, "status": "failed", "seconds": seconds, **(labels or {}), **assignment,
                "error": tail(result.stdout + "\n" + result.stderr, 8)}
    print(f"{name}: done in {seconds} s")
    return {"experiment": name, "status": "done", "seconds": seconds, **(labels or {}), **assignment, "error": ""}


@flow(name="cirflow-sweep", log_prints=True)
def sweep(grid: Grid, root: str = ".", out: str | None = None, parallel: int | None = None,
          resume: bool = False) -> list[dict]:
    """Run every combination of `grid` as a DVC experiment, `parallel` (default `orchestration.parallel`) at a
    time; returns one row per experiment. The CSV is rewritten as each experiment ends, so a sweep that dies keeps
    what it finished; with `resume`, the points that a CSV at `out` already holds as done are not run again."""
    cfg = load_orchestration(Path(root))
    if parallel is not None:
        if parallel < 1:
            raise ValueError(f"--parallel {parallel}: must be at least 1")
        cfg = dataclasses.replace(cfg, parallel=parallel)
    if resume and out is None:
        raise ValueError("--resume needs --out: the CSV of the sweep to resume")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_path = Path(root) / (out or f"sweeps/sweep-{stamp}.csv")
    kept = [row for row in read_csv(out_path) if row.get("status") == "done"] if resume and out_path.exists() else []
    points = [point for point in combinations(grid) if not any(_holds(row, *point) for row in kept)]
    if kept:
        print(f"sweep: resuming {out_path}: {len(kept)} experiments done before, {len(points)} to run")
    rows = list(kept)

    def finished(future) -> None:
        row = future.result()
        if row["status"] == "done":  # params.* and <metrics file>.* from DVC; the grid's own columns stay as given
            row.update({k: v for k, v in experiment_rows(Path(root), {row["experiment"]}).get(
                row["experiment"], {}).items() if k not in row})
        rows.append(row)
        write_csv(out_path, rows)

    jobs = [(f"sweep-{stamp}-{i:02d}", point) for i, point in enumerate(points)]
    _at_most(cfg.parallel, [
        (lambda name=name, labels=labels, assignment=assignment:
         run_experiment.with_options(task_run_name=name).submit(root, name, assignment, labels))
        for name, (labels, assignment) in jobs], on_done=finished)
    order = {name: i for i, (name, _) in enumerate(jobs)}
    rows = kept + sorted(rows[len(kept):], key=lambda row: order[row["experiment"]])
    write_csv(out_path, rows)
    create_table_artifact(key="cirflow-sweep", table=rows, description=f"sweep {stamp}: {len(rows)} experiments")
    failed = [row["experiment"] for row in rows if row["status"] == "failed"]
    print(f"sweep: {len(rows) - len(failed)} done, {len(failed)} failed {failed or ''} -> {out_path}")
    return rows


def _holds(row: dict, labels: dict[str, str], assignment: dict[str, str]) -> bool:
    """Whether a CSV row is the experiment of this grid point (its labels and params, as the CSV wrote them)."""
    return all(str(row.get(k)) == str(v) for k, v in {**labels, **assignment}.items())


def _at_most(parallel: int, starts: list, on_done: Callable | None = None) -> list:
    """Call each `start()` (which submits a task and returns its future) in order, with at most `parallel` futures
    unfinished at a time: a slot frees as soon as any experiment ends, and `on_done(future)` is called for each as
    it ends. Returns the futures in the order given, once all have ended."""
    futures, running = [], []

    def reap() -> None:
        nonlocal running
        still = []
        for f in running:
            if f.state.is_final():
                if on_done is not None:
                    on_done(f)
            else:
                still.append(f)
        running = still

    for start in starts:
        reap()
        while len(running) >= parallel:
            time.sleep(1)
            reap()
        future = start()
        futures.append(future)
        running.append(future)
    while running:
        time.sleep(0.2)
        reap()
    return futures


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict]) -> None:
    from stages.common.atomic import atomic_path

    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="sets", action="append", metavar="KEY=V1,V2", help="a grid axis (repeatable)")
    parser.add_argument("--grid", type=Path, help="YAML file: param -> list of values")
    parser.add_argument("--root", default=".", help="the DVC repository (default: here)")
    parser.add_argument("--out", help="CSV path relative to the root (default: sweeps/sweep-<time>.csv)")
    parser.add_argument("--resume", action="store_true", help="keep the experiments that the CSV at --out holds as "
                        "done and run only the rest (the CSV is rewritten as each experiment ends)")
    parser.add_argument("--parallel", type=int, help="experiments at once (default: orchestration.parallel); on a "
                        "small CPU give each one thread: OMP_NUM_THREADS=1")
    args = parser.parse_args(argv)
    grid = parse_grid(args.sets, args.grid)
    rows = sweep(grid=grid, root=args.root, out=args.out, parallel=args.parallel, resume=args.resume)
    for row in rows:
        print(f"{row['experiment']}  {row['status']:<6}  " + "  ".join(f"{k}={row[k]}" for k in grid if k in row))


if __name__ == "__main__":
    main()
