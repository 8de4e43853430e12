"""Flow `repro`: the DVC graph as Prefect tasks, one per stage, run in dependency order.

    python -m pipelines.repro [--root .] [--set train.lr=0.01 ...]

Each task runs `dvc repro --single-item <stage>` (with `--set`: `dvc exp run --single-item <stage>
-S ...`: DVC applies the overrides and records a workspace experiment, leaving the workspace's
params.yaml at its values, as `dvc exp run` always does; this flow never edits params.yaml itself). It records whether DVC ran the stage, found it up to date, or restored it from the
run-cache, its wall time and the metrics it wrote. The stage's output streams into the flow run's log line by
line. A failing stage is retried `orchestration.retries` times, then fails the flow with DVC's own error text;
later stages do not run. A params or input error (the stage exits with 2: a bad key, value or file, the same on
every try) fails at once. Before each stage, DVC locks left by a dvc process that no longer runs (a `kill -9`) are removed, each
with a log line.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipelines.common import Stage, dvc, load_orchestration, parse_overrides, remove_stale_locks, stages_in_order, tail

STATUS_LINES = {  # what `dvc repro` prints for each outcome
    "ran": "Running stage '{}'",
    "up_to_date": "Stage '{}' didn't change, skipping",
    "restored": "Stage '{}' is cached - skipping run, checking out outputs",
}


class StageFailed(RuntimeError):
    pass


class ParamsFailed(StageFailed):
    """The stage refused its params or input (exit code 2, stages.common.errors.run_stage): retrying cannot help."""


PARAMS_EXIT = "exited with 2"  # how `dvc repro` reports a stage's exit code 2 (stages.common.errors.run_stage)


def retry_unless_params_error(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry any failure but a ParamsFailed."""
    try:
        state.result()
    except ParamsFailed:
        return False
    except BaseException:
        return True
    return True


def classify(stage: str, output: str) -> str:
    for status, line in STATUS_LINES.items():
        if line.format(stage) in output:
            return status
    raise StageFailed(f"stage '{stage}': DVC printed none of the known outcomes:\n{tail(output)}")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return flat


@task
def run_stage(root: str, stage: Stage, overrides: list[str]) -> dict:
    if overrides:
        args = ["exp", "run", "--single-item", stage.name, *(a for o in overrides for a in ("-S", o))]
    else:
        args = ["repro", "--single-item", stage.name]
    logger = get_run_logger()
    for removed in remove_stale_locks(Path(root)):
        logger.warning(f"removed a stale DVC lock: {removed}: its process no longer runs")
    began = time.perf_counter()
    result = dvc(args, Path(root), stream=logger.info)
    seconds = round(time.perf_counter() - began, 2)
    if result.returncode != 0:
        output = tail(result.stdout + "\n" + result.stderr)
        failure = ParamsFailed if PARAMS_EXIT in result.stdout else StageFailed
        raise failure(f"stage '{stage.name}' failed (dvc exit {result.returncode}):\n{output}")
    metrics = {path: flatten(json.loads((Path(root) / path).read_text())) for path in stage.metrics}
    status = classify(stage.name, result.stdout)
    print(f"{stage.name}: {status.replace('_', ' ')} in {seconds} s")
    return {"stage": stage.name, "status": status, "seconds": seconds, "metrics": metrics}


@flow(name="cirflow-repro", log_prints=True)
def repro(root: str = ".", overrides: list[str] | None = None) -> list[dict]:
    """Run every stage of dvc.yaml in dependency order; returns one record per stage."""
    overrides = parse_overrides(overrides)
    cfg = load_orchestration(Path(root))
    results = []
    for stage in stages_in_order(Path(root)):
        run = run_stage.with_options(name=stage.name, task_run_name=stage.name, retries=cfg.retries,
                                     retry_delay_seconds=cfg.retry_delay_seconds,
                                     retry_condition_fn=retry_unless_params_error)
        results.append(run(root, stage, overrides))
    if all(r["status"] != "ran" for r in results):
        print("repro: nothing to do, every stage was up to date or restored from the run-cache")
    table = dvc(["metrics", "show", "--md"], Path(root))
    create_markdown_artifact(key="cirflow-metrics", description="dvc metrics show after the repro flow",
                             markdown=table.stdout if table.returncode == 0 else f"```\n{table.stderr}\n```")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="the DVC repository (default: here)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="a param override passed to DVC as -S (repeatable; wins over --recipe)")
    parser.add_argument("--recipe", help="a released recipe (pipelines/recipes/NAME.yaml; python -m pipelines.recipes)")
    args = parser.parse_args(argv)
    from pipelines import recipes

    overrides = recipes.overrides(args.recipe, args.overrides, Path(args.root) / "params.yaml")
    for record in repro(root=args.root, overrides=overrides):
        print(f"{record['stage']:<12} {record['status']:<11} {record['seconds']:>8.2f} s")


if __name__ == "__main__":
    main()
