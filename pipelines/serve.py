"""Serve the `repro` and `sweep` flows as Prefect deployments, `repro` on an optional cron schedule.

    python -m pipelines.serve [--root .]

Against a running `prefect server start` (PREFECT_API_URL set) the deployments appear in the UI and
`prefect deployment run cirflow-repro/repro` starts one; `orchestration.schedule` in params.yaml
(a cron expression, e.g. "0 2 * * *" for nightly at 02:00) schedules `repro`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from prefect import serve

from pipelines.common import OrchestrationConfig, load_orchestration
from pipelines.repro import repro
from pipelines.sweep import sweep


def deployments(root: Path, cfg: OrchestrationConfig) -> list:
    root = str(Path(root).resolve())
    return [
        repro.to_deployment(name="repro", cron=cfg.schedule, parameters={"root": root},
                            description="dvc repro of the whole graph, one task per stage"),
        sweep.to_deployment(name="sweep", parameters={"root": root, "grid": {"train.lr": ["0.01", "0.05"]}},
                            description="a grid of DVC experiments; pass `grid` when running"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="the DVC repository (default: here)")
    args = parser.parse_args(argv)
    serve(*deployments(args.root, load_orchestration(args.root)))


if __name__ == "__main__":
    main()
