"""The Prefect flows on a tiny copy of the repository: real Prefect (a temporary server), real DVC."""
import asyncio
import csv
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import TaskRunSort
from prefect.testing.utilities import prefect_test_harness

from pipelines.common import OrchestrationConfig, stages_in_order
from pipelines.repro import repro
from pipelines.serve import deployments
from pipelines import report
from pipelines.common import experiment_rows
from pipelines.sweep import combinations, parse_grid, sweep
from stages.common.params import parse
from tiny_repo import STAGES, make_tiny_repo, set_param


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, prefect_server):
    return make_tiny_repo(tmp_path_factory.mktemp("flows"))


def task_runs(state) -> list:
    async def read():
        async with get_client() as client:
            flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            return await client.read_task_runs(flow_run_filter=flow_run, sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100)
    return asyncio.run(read())


def test_repro_runs_one_task_per_stage_in_dvc_order_then_skips_them(tiny):
    state = repro(root=str(tiny), return_state=True)
    assert state.is_completed()
    records = state.result()
    assert [r["stage"] for r in records] == STAGES
    assert [r["status"] for r in records] == ["ran"] * len(STAGES)
    assert [run.name for run in task_runs(state)] == STAGES
    evaluated = records[STAGES.index("evaluate")]
    assert evaluated["metrics"]["metrics/evaluate.json"]["composed.test.target.queries"] == 60

    again = repro(root=str(tiny))
    assert {r["status"] for r in again} == {"up_to_date"}


def test_overrides_go_to_dvc_as_set_params_and_rerun_only_what_they_touch(tiny):
    try:
        records = repro(root=str(tiny), overrides=["train.steps=7"])
    finally:
        set_param(tiny, "train", "steps", 6)
    status = {r["stage"]: r["status"] for r in records}
    assert status["train"] == "ran" and status["evaluate"] == "ran"
    assert {status[s] for s in STAGES[:STAGES.index("train")]} == {"up_to_date"}
    with pytest.raises(ValueError, match="expected key=value"):
        repro.fn(root=str(tiny), overrides=["train.steps"])


def flow_logs(state) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read():
        messages = []
        async with get_client() as client:
            while True:  # the API hands out at most 200 at a time
                page = await client.read_logs(log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])), limit=200,
                    offset=len(messages))
                messages += [log.message for log in page]
                if len(page) < 200:
                    return messages
    return asyncio.run(read())


def test_a_params_error_fails_the_flow_at_once_with_its_own_error(tiny):
    set_param(tiny, "orchestration", "retries", 2)
    set_param(tiny, "mine", "k", 0)
    try:
        state = repro(root=str(tiny), return_state=True)
    finally:
        set_param(tiny, "mine", "k", 5)
        set_param(tiny, "orchestration", "retries", 1)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"params\.yaml: mine\.k: Input should be greater than 0"):
        state.result()
    runs = {run.name: run for run in task_runs(state)}
    assert runs["mine"].run_count == 1  # exit code 2: the same on every try, so no retry
    assert "train" not in runs and "evaluate" not in runs  # nothing after the failed stage


def test_another_failure_is_retried_and_stage_output_streams_into_the_flow_log(tiny):
    dvc_yaml = yaml.safe_load((tiny / "dvc.yaml").read_text())
    flaky = ("python -c \"import pathlib, sys; p = pathlib.Path('tries'); n = int(p.read_text()) if p.exists() else 0; "
             "p.write_text(str(n + 1)); print('flaky try', n + 1); sys.exit(0 if n else 1)\"")
    dvc_yaml["stages"]["flaky"] = {"cmd": flaky, "deps": ["metrics/evaluate.json"], "outs": ["flaky.txt"]}
    dvc_yaml["stages"]["flaky"]["cmd"] += " && python -c \"open('flaky.txt', 'w').write('ok')\""
    (tiny / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    set_param(tiny, "orchestration", "retries", 2)
    try:
        state = repro(root=str(tiny), return_state=True)
    finally:
        set_param(tiny, "orchestration", "retries", 1)
        del dvc_yaml["stages"]["flaky"]
        (tiny / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    assert state.is_completed()
    runs = {run.name: run for run in task_runs(state)}
    assert runs["flaky"].run_count == 2  # failed once (exit 1), retried, passed
    logs = flow_logs(state)
    for _ in range(30):  # Prefect ships logs to its API in the background: the last stage's may come a moment later
        if "flaky try 1" in logs and "flaky try 2" in logs:
            break
        time.sleep(1)
        logs = flow_logs(state)
    assert "flaky try 1" in logs and "flaky try 2" in logs  # each line of the stage, as it printed it


def test_a_kill_9_leaves_a_lock_that_the_flow_removes_and_training_resumes(tiny):
    """kill -9 of `dvc repro` during train: the dvc process stays a zombie (its parent has not reaped it), so DVC
    keeps seeing its PID and refuses to go on; the flow removes that lock, says so, and train resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time as clock

    set_param(tiny, "train", "steps", 400)
    set_param(tiny, "train", "checkpoint_every", 20)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc_repro = subprocess.Popen(["dvc", "repro"], cwd=tiny, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = clock.monotonic() + 300
        while not list(tiny.glob("data/.train.partial-*/resume.pt")):
            assert clock.monotonic() < deadline and dvc_repro.poll() is None, "train never checkpointed"
            clock.sleep(0.2)
        os.killpg(dvc_repro.pid, signal.SIGKILL)  # dvc and the stage under it; not waited for: a zombie
        clock.sleep(1)
        blocked = subprocess.run(["dvc", "repro"], cwd=tiny, env=env, capture_output=True, text=True)
        assert blocked.returncode != 0 and "is busy, it is being blocked by" in blocked.stderr
        state = repro(root=str(tiny), return_state=True)
        assert state.is_completed(), state
        logs = flow_logs(state)
        assert any(f"removed a stale DVC lock: write lock on" in line and f"PID {dvc_repro.pid}" in line
                   for line in logs), [line for line in logs if "lock" in line]
        assert any("train: resuming at step" in line for line in logs)
    finally:
        dvc_repro.wait()
        set_param(tiny, "train", "steps", 6)
        set_param(tiny, "train", "checkpoint_every", 5)


def test_sweep_over_a_2x2_grid_gives_four_experiments_with_distinct_metrics(tiny):
    grid = parse_grid(["train.lr=0.01,0.05", "train.steps=4,8"], None)
    rows = sweep(grid=grid, root=str(tiny), out="sweeps/grid.csv")
    assert [r["status"] for r in rows] == ["done"] * 4
    assert {(r["train.lr"], r["train.steps"]) for r in rows} == {("0.01", "4"), ("0.01", "8"), ("0.05", "4"), ("0.05", "8")}
    metric_rows = {tuple(v for k, v in sorted(r.items()) if k.startswith("evaluate.composed.")) for r in rows}
    assert len(metric_rows) == 4 and all(metric_rows)
    with open(tiny / "sweeps/grid.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_a_failing_experiment_is_listed_and_the_others_complete(tiny):
    rows = sweep(grid={"train.lr": ["-1", "0.02"]}, root=str(tiny), out="sweeps/bad.csv")
    failed, done = rows
    assert failed["status"] == "failed" and "train.lr: Input should be greater than 0" in failed["error"]
    assert done["status"] == "done" and "evaluate.composed.test.target.r10" in done


def test_a_resumed_sweep_keeps_the_done_rows_of_its_csv_and_runs_only_the_rest(tiny):
    out = tiny / "sweeps/resume.csv"
    out.parent.mkdir(exist_ok=True)
    out.write_text("experiment,status,seconds,train.lr,error,evaluate.composed.test.target.r1\n"
                   "sweep-earlier-00,done,1.0,0.01,,12.5\n"
                   "sweep-earlier-01,failed,1.0,0.05,some error,\n")
    rows = sweep(grid={"train.lr": ["0.01", "0.05"]}, root=str(tiny), out="sweeps/resume.csv", resume=True)
    assert [(r["experiment"], r["train.lr"]) for r in rows][0] == ("sweep-earlier-00", "0.01")
    assert rows[0]["evaluate.composed.test.target.r1"] == "12.5"  # kept as the CSV had it, not run again
    assert len(rows) == 2 and rows[1]["train.lr"] == "0.05" and rows[1]["status"] == "done"  # the failed one re-ran
    assert rows[1]["experiment"].startswith("sweep-2") and "evaluate.composed.test.target.r10" in rows[1]
    with open(out) as f:
        assert [r["train.lr"] for r in csv.DictReader(f)] == ["0.01", "0.05"]
    with pytest.raises(ValueError, match="--resume needs --out"):
        sweep.fn(grid={"train.lr": ["0.01"]}, root=str(tiny), resume=True)


def test_a_sweep_on_a_dask_cluster_runs_its_experiments_on_the_workers(tiny):
    """--dask ADDRESS: the experiments go to the cluster's workers (here 2 local processes, one thread each, the
    repository at the same path), both at once; the rows come back with their metrics. The grid changes an
    `evaluate` param: the experiments rerun only that stage (the others come from DVC's run cache)."""
    from distributed import LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Workers(SchedulerPlugin):  # which worker finished each task
        name = "finished-on"

        def __init__(self):
            self.finished = []

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "memory" and kwargs.get("worker"):
                self.finished.append(kwargs["worker"])

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        workers = Workers()
        cluster.scheduler.add_plugin(workers)
        rows = sweep(grid={"evaluate.batch_size": ["32", "48"]}, root=str(tiny), out="sweeps/dask.csv",
                     dask=cluster.scheduler_address)
    assert [(r["evaluate.batch_size"], r["status"]) for r in rows] == [("32", "done"), ("48", "done")]
    assert all("evaluate.composed.test.target.r10" in r for r in rows)
    assert len(workers.finished) == 2 and len(set(workers.finished)) == 2  # one experiment on each worker
    with open(tiny / "sweeps/dask.csv") as f:
        assert [r["evaluate.batch_size"] for r in csv.DictReader(f)] == ["32", "48"]


def test_report_tables_the_sweep_from_its_csv_alone(tiny, tmp_path, capsys, monkeypatch):
    """Runs after the 2x2 sweep above: its four experiments, one table row each, numbers as DVC had them when the
    sweep wrote the CSV; read from a copy of the CSV in a folder that is no DVC repository (a clean clone's view)."""
    with open(tiny / "sweeps/grid.csv") as f:
        rows = list(csv.DictReader(f))
    shown = experiment_rows(tiny, {row["experiment"] for row in rows})
    for row in rows:
        assert float(row["evaluate.composed.test.target.r1"]) == shown[row["experiment"]]["evaluate.composed.test.target.r1"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "grid.csv").write_bytes((tiny / "sweeps/grid.csv").read_bytes())
    monkeypatch.chdir(elsewhere)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.BEGIN}\nold\n{report.END}\ntail\n")
    report.main(["--csv", "grid.csv", "--readme", str(readme)])
    table = readme.read_text().split(report.BEGIN)[1].split(report.END)[0].strip().splitlines()
    assert table[0].startswith("| model | GA | test R@1") and len(table) == 2 + 4
    for row, line in zip(rows, table[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == "tirg" and cells[1] == "—"
        assert cells[2] == f"{float(row['evaluate.composed.test.target.r1']):.1f}"
        assert cells[6] == f"{float(row['evaluate.composed.novel.target.r10']):.1f}"
        assert cells[9] == f"{float(row['evaluate.composed.whm.target.r10']):.1f}"
    assert readme.read_text().endswith("tail\n") and "old" not in readme.read_text()


def test_matching_rows_get_the_matching_table():
    row = {"params.task": "matching", "params.loss.name": "nce", "params.train.offline_negatives": False,
           "params.train.siam_steps": 100, "evaluate.test.all.i2t.r1": 12.34, "evaluate.test.all.t2i.r1": 9.0,
           "evaluate.test.all.rsum": 150.0, "evaluate.novel.all.rsum": 120.0,
           "evaluate.test.siam_reranked.t2i.r1": 11.0, "pretrain.seconds": 10, "train.seconds": 5,
           "train.siam_seconds": 2.4}
    lines = report.table([row]).splitlines()
    assert lines[0].startswith("| method | test i2t R@1")
    assert lines[2] == "| DE NCE + SIAM | 12.3 | 9.0 | 150.0 | 120.0 | 11.0 | 17 |"


def test_named_options_change_params_together(tmp_path):
    (tmp_path / "grid.yaml").write_text(
        "model:\n  tirg: {model.name: tirg, loss.name: bbc}\n  val: {model.name: val, loss.name: val_matching}\n"
        "ga.adversarial: [false, true]\n")
    points = combinations(parse_grid(None, tmp_path / "grid.yaml"))
    assert points == [
        ({"model": "tirg"}, {"model.name": "tirg", "loss.name": "bbc", "ga.adversarial": "false"}),
        ({"model": "tirg"}, {"model.name": "tirg", "loss.name": "bbc", "ga.adversarial": "true"}),
        ({"model": "val"}, {"model.name": "val", "loss.name": "val_matching", "ga.adversarial": "false"}),
        ({"model": "val"}, {"model.name": "val", "loss.name": "val_matching", "ga.adversarial": "true"}),
    ]
    (tmp_path / "bad.yaml").write_text("model:\n  tirg: tirg\n")
    with pytest.raises(ValueError, match="model.tirg: expected a mapping"):
        parse_grid(None, tmp_path / "bad.yaml")


def test_grid_from_yaml_file(tmp_path):
    (tmp_path / "grid.yaml").write_text("train.lr: [0.01, 0.1]\nmodel.embed_dim: 64\n")
    assert parse_grid(None, tmp_path / "grid.yaml") == {"train.lr": ["0.01", "0.1"], "model.embed_dim": ["64"]}
    with pytest.raises(ValueError, match="expected key=value1,value2"):
        parse_grid(["train.lr"], None)


def test_the_flow_graph_is_derived_from_dvc_yaml(tiny):
    dvc_yaml = yaml.safe_load((tiny / "dvc.yaml").read_text())
    dvc_yaml["stages"]["report"] = {"cmd": "python -c \"open('report.txt','w').write('ok')\"",
                                    "deps": ["metrics/evaluate.json"], "outs": ["report.txt"]}
    (tiny / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    assert [s.name for s in stages_in_order(tiny)] == [*STAGES, "report"]
    records = repro(root=str(tiny))
    assert records[-1]["stage"] == "report" and records[-1]["status"] == "ran"
    assert (tiny / "report.txt").read_text() == "ok"


def test_serve_schedules_repro_from_params():
    cfg = parse(OrchestrationConfig, "orchestration",
                {"retries": 0, "retry_delay_seconds": 0, "parallel": 1, "schedule": "0 2 * * *"})
    repro_deployment, sweep_deployment = deployments(Path("."), cfg)
    assert repro_deployment.schedules[0].schedule.cron == "0 2 * * *"
    assert sweep_deployment.schedules == []
    with pytest.raises(Exception, match="orchestration.schedule: must be a 5-field cron"):
        parse(OrchestrationConfig, "orchestration", {**vars(cfg), "schedule": "nightly"})


def test_at_most_n_experiments_run_at_once_and_a_slot_frees_when_any_ends():
    import time as clock

    from pipelines.sweep import _at_most

    class Future:  # a task of `seconds`, with the state API the sweep reads from a Prefect future
        def __init__(self, seconds):
            self.start = clock.monotonic()
            self.end = self.start + seconds

        @property
        def state(self):
            return type("State", (), {"is_final": lambda _: clock.monotonic() >= self.end})()

    ended = []
    futures = _at_most(2, [lambda s=s: Future(s) for s in (3.0, 0.1, 0.1, 0.1)],
                       on_done=lambda f: ended.append((f, clock.monotonic())))
    assert len(futures) == 4
    # on_done once for each, after it ended, the long one last (the CSV is written as each experiment ends)
    assert [f for f, _ in ended] == futures[1:] + futures[:1] and all(at >= f.end for f, at in ended)
    for i, f in enumerate(futures):  # never more than two unfinished at a start
        assert sum(1 for g in futures[:i] if g.end > f.start) <= 1
    # the short ones follow each other beside the long one, which does not hold its batch back
    assert futures[3].start < futures[0].end


def test_the_temporary_server_gets_time_to_start_on_a_busy_machine():
    import os
    import subprocess
    import sys

    read = ("import pipelines; from prefect.settings import get_current_settings; "
            "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    assert subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "180"  # Prefect's own default is 20
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "45"
    assert subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "45"
