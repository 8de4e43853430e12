"""Flow `sweep`: every combination of a parameter grid as a DVC experiment, then one results table.

    python -m pipelines.sweep --set train.lr=0.01,0.05 --set train.steps=150,300 [--grid grid.yaml]
                              [--root .] [--out sweeps/<name>.csv]

A grid file maps a param to its values, or an axis name to named options, each a group of params that
change together (e.g. `model: {val: {model.name: val, loss.name: val_matching}, ...}`); the sweep is the
product of all axes. sweeps/shapes_models.yaml is the four-models-with-and-without-GA sweep.

Each combination is one Prefect task running `dvc exp run --temp -n <name> -S ...`, at most
`orchestration.parallel` (or `--parallel`) at a time. (`--temp` runs each experiment in its own temporary copy of the
workspace and needs no queue worker in the background; DVC's `--queue` + celery workers add a
second scheduler with its own state to watch, which Prefect already is.) With more than one at a time, each
experiment gets its own GPUs: CUDA_VISIBLE_DEVICES from the devices present, one slot per running experiment
(`device_slots`; nothing is set on a machine without GPUs). `--dask tcp://host:8786` sends the experiments to
the workers of a Dask cluster through Prefect's DaskTaskRunner instead; every worker needs this repository and
its data at the same path (docs/scaling.md). A failing experiment is
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
import os
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
def run_experiment(root: str, name: str, assignment: dict[str, str], labels: dict[str, str] | None = None,
                   env: dict[str, str] | None = None) -> dict:
    """`dvc exp run --temp` of one grid point in `root` (on a Dask worker: the worker's `root`), with `env` added to
    its environment; its row, with the experiment's params and metrics as `dvc exp show` has them there."""
    args = ["exp", "run", "--temp", "--name", name, *(a for k, v in assignment.items() for a in ("-S", f"{k}={v}"))]
    began = time.perf_counter()
    result = dvc(args, Path(root), env=env)
    seconds = round(time.perf_counter() - began, 1)
    where = f" (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})" if env and "CUDA_VISIBLE_DEVICES" in env else ""
    if result.returncode != 0:
        print(f"{name}: failed after {seconds} s{where}")
        return {"experiment": name, "status": "failed", "seconds": seconds, **(labels or {}), **assignment,
                "error": tail(result.stdout + "\n" + result.stderr, 8)}
    print(f"{name}: done in {seconds} s{where}")
    row = {"experiment": name, "status": "done", "seconds": seconds, **(labels or {}), **assignment, "error": ""}
    # params.* and <metrics file>.* from DVC; the grid's own columns stay as given
    shown = experiment_rows(Path(root), {name}).get(name, {})
    return {**row, **{k: v for k, v in shown.items() if k not in row}}


@flow(name="cirflow-sweep", log_prints=True)
def sweep(grid: Grid, root: str = ".", out: str | None = None, parallel: int | None = None,
          resume: bool = False, dask: str | None = None) -> list[dict]:
    """Run every combination of `grid` as a DVC experiment, `parallel` (default `orchestration.parallel`) at a
    time; returns one row per experiment. The CSV is rewritten as each experiment ends, so a sweep that dies keeps
    what it finished; with `resume`, the points that a CSV at `out` already holds as done are not run again.

    With more than one at a time on this machine, each experiment gets its own GPUs through CUDA_VISIBLE_DEVICES
    (device_slots; nothing is set where there is no GPU). `dask`: the address of a Dask scheduler whose workers run
    the experiments (Prefect's DaskTaskRunner), each in its own `root`; all at once unless `parallel` is given, the
    cluster's worker threads decide how many run, and each worker's own environment says which GPU it uses."""
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
        rows.append(future.result())
        write_csv(out_path, rows)

    jobs = [(f"sweep-{stamp}-{i:02d}", point) for i, point in enumerate(points)]
    if dask is None:
        def submit(name, labels, assignment, env):
            return run_experiment.with_options(task_run_name=name).submit(root, name, assignment, labels, env)

        launch(jobs, cfg.parallel, visible_devices() if cfg.parallel > 1 else [], submit, finished)
    else:
        from prefect_dask import DaskTaskRunner

        from stages.common.parallel import api_for_workers

        with api_for_workers(dask), DaskTaskRunner(address=dask) as runner:
            def submit(name, labels, assignment, env):  # the workers' repository: the same path, absolute
                return runner.submit(run_experiment.with_options(task_run_name=name), parameters=dict(
                    root=str(Path(root).resolve()), name=name, assignment=assignment, labels=labels, env=env))

            launch(jobs, parallel or len(jobs) or 1, [], submit, finished)
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


def visible_devices() -> list[str]:
    """The GPUs this machine lends to experiments: the entries of CUDA_VISIBLE_DEVICES where it is set, else
    0 .. n-1 for the n devices torch sees (none without CUDA)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [device.strip() for device in listed.split(",") if device.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def device_slots(devices: list[str], parallel: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of `parallel` slots (experiments at once): with at least as many GPUs as
    slots, each slot its own len(devices) // parallel of them (8 GPUs, 2 slots: 0,1,2,3 and 4,5,6,7, for
    experiments that train with nproc_per_node 4); with fewer, slot i shares GPU i mod n; with no GPU or one slot,
    None: nothing is set."""
    if parallel == 1 or not devices:
        return [None] * parallel
    if len(devices) >= parallel:
        each = len(devices) // parallel
        return [",".join(devices[i * each:(i + 1) * each]) for i in range(parallel)]
    return [devices[i % len(devices)] for i in range(parallel)]


class Slots:
    """The slots of a sweep's running experiments and their devices. A starting experiment takes a free slot:
    the one whose devices the fewest running experiments use, ties going round-robin from the slot after the last
    one taken; an ending one gives its slot back."""

    def __init__(self, devices: list[str | None]):
        self.devices, self.busy, self.last = devices, set(), -1

    def take(self) -> int:
        n = len(self.devices)
        free = [s % n for s in range(self.last + 1, self.last + 1 + n) if s % n not in self.busy]
        if not free:
            raise RuntimeError("no free slot: more experiments started than slots")
        used = [self.devices[s] for s in self.busy]
        slot = min(free, key=lambda s: used.count(self.devices[s]))
        self.busy.add(slot)
        self.last = slot
        return slot

    def give_back(self, slot: int) -> None:
        self.busy.discard(slot)


def launch(jobs: list, parallel: int, devices: list[str], submit: Callable, on_done: Callable | None = None) -> list:
    """Submit every job (name, (labels, assignment)) as `submit(name, labels, assignment, env)` (which returns a
    future), at most `parallel` unfinished at a time, each with the CUDA_VISIBLE_DEVICES of the slot it takes
    (device_slots(devices, parallel); env None where it sets nothing); `on_done(future)` as each ends."""
    slots = Slots(device_slots(devices, parallel))
    held: dict[int, int] = {}  # id(future) -> its slot

    def start(name, labels, assignment):
        slot = slots.take()
        device = slots.devices[slot]
        future = submit(name, labels, assignment, None if device is None else {"CUDA_VISIBLE_DEVICES": device})
        held[id(future)] = slot
        return future

    def ended(future) -> None:
        slots.give_back(held.pop(id(future)))
        if on_done is not None:
            on_done(future)

    return _at_most(parallel, [lambda name=name, point=point: start(name, *point) for name, point in jobs],
                    on_done=ended)


def _ended(future) -> bool:
    """Whether a submitted experiment has ended, read from the future itself (a Prefect future wrapping a
    concurrent.futures or Dask future: no call to the Prefect API), else from its state."""
    wrapped = getattr(future, "wrapped_future", None)
    return wrapped.done() if wrapped is not None else future.state.is_final()


def _at_most(parallel: int, starts: list, on_done: Callable | None = None) -> list:
    """Call each `start()` (which submits a task and returns its future) in order, with at most `parallel` futures
    unfinished at a time: a slot frees as soon as any experiment ends, and `on_done(future)` is called for each as
    it ends. Returns the futures in the order given, once all have ended."""
    futures, running = [], []

    def reap() -> None:
        nonlocal running
        still = []
        for f in running:
            if _ended(f):
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
    parser.add_argument("--parallel", type=int, help="experiments at once (default: orchestration.parallel), each "
                        "with its own GPUs when there are some (CUDA_VISIBLE_DEVICES); on a small CPU give each one "
                        "thread: OMP_NUM_THREADS=1")
    parser.add_argument("--dask", metavar="ADDRESS", help="run the experiments on the workers of this Dask scheduler "
                        "(tcp://host:8786), each needing this repository and its data at the same path; all at "
                        "once unless --parallel says otherwise (docs/scaling.md)")
    args = parser.parse_args(argv)
    grid = parse_grid(args.sets, args.grid)
    rows = sweep(grid=grid, root=args.root, out=args.out, parallel=args.parallel, resume=args.resume, dask=args.dask)
    for row in rows:
        print(f"{row['experiment']}  {row['status']:<6}  " + "  ".join(f"{k}={row[k]}" for k in grid if k in row))


if __name__ == "__main__":
    main()
