"""stages.common.parallel: prepare, resize and shard give the same bytes on a process pool, on a 2-worker local Dask
cluster (through Prefect) and on a running Dask scheduler as in one process; a failing item is named, never hangs."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import cloudpickle
import pytest
import yaml
from distributed.diagnostics.plugin import SchedulerPlugin

from stages.datasets import manifest
from stages.common import parallel
from stages import prepare, resize, shard
from stages.shards import store
from stages.common.errors import StageError
from stages.common.parallel import ParallelConfig, map_items
from stages.common.params import ParamsError, parse
from tiny_repo import REPO, TINY

# Workers unpickle this module's functions by value: they need not import the tests.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.timeout(300)

# items_per_task: every Prefect task costs a few API calls (~0.1-0.4 s here); 64 still gives each stage
# several tasks per worker on the tiny data (378 images, 17 shards)
SERIAL = dict(runner="processes", workers=1, address=None, items_per_task=64)
POOL = dict(runner="processes", workers=2, address=None, items_per_task=64)
DASK_LOCAL = dict(runner="dask", workers=2, address=None, items_per_task=64)


def config(**changes) -> ParallelConfig:
    return parse(ParallelConfig, "parallel", {**SERIAL, **changes})


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path: what 'byte for byte the same output' compares."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_params(path: Path, parallel_section: dict, shard_section: dict | None = None) -> Path:
    """params.yaml with the repository's prepare/resize/shard sections, the tiny shapes data and `parallel`."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"]["shapes"].update(TINY["dataset"]["shapes"])
    params["resize"].update(TINY["resize"])
    params["shard"].update(shard_section or {"maxcount": 40})
    params["parallel"] = parallel_section
    path.write_text(yaml.safe_dump(params))
    return path


def run_stages(root: Path, params_path: Path, prepared: Path | None = None) -> dict[str, Path]:
    """prepare -> resize -> shard into root (prepare skipped when `prepared` is given)."""
    out = {"prepared": prepared or root / "prepared", "resized": root / "resized", "shards": root / "shards"}
    if prepared is None:
        prepare.prepare(out["prepared"], params_path)
    resize.resize(out["prepared"], out["resized"], params_path)
    shard.shard(out["resized"], out["shards"], params_path)
    return out


def fussy_square(x: int) -> int:
    if x == 3:
        raise StageError("three is bad input")
    return x * x


def pid_of(x: int) -> tuple[int, int]:
    return x, os.getpid()


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect server and database for this module (as tests/test_pipelines.py runs flows)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serial")
    return run_stages(root, write_params(root / "params.yaml", SERIAL))


@pytest.fixture(scope="module")
def scheduler():
    """A running Dask scheduler with 2 worker processes, as a real cluster would be (but local)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        cluster.scheduler.add_plugin(FinishedTasks())
        yield cluster


class FinishedTasks(SchedulerPlugin):
    """Counts the tasks a scheduler saw finish."""
    name = "finished-tasks"

    def __init__(self):
        self.count = 0

    def transition(self, key, start, finish, *args, **kwargs):
        self.count += finish == "memory"


# --- the plan, without Prefect --------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,count,expected",
    [
        (dict(workers=1), 1000, (1, 64)),  # one worker: here
        (dict(workers=2), 1, (1, 1)),  # one item: here
        (dict(workers=2), 1000, (2, 64)),
        (dict(workers=2, items_per_task=8), 100, (2, 8)),
        (dict(workers=4), 10, (4, 3)),  # few items: every worker gets some
        (dict(workers=8), 3, (3, 1)),  # no more workers than items
        (dict(runner="dask", address="tcp://h:8786", items_per_task=5), 12, (0, 5)),  # the cluster's workers
    ],
)
def test_plan_spreads_items_over_the_workers(cfg, count, expected):
    assert parallel.plan(config(**cfg), count) == expected


def test_one_worker_runs_here_in_order():
    assert map_items(pid_of, range(5), config(), "pids") == [(i, os.getpid()) for i in range(5)]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"runner": "threads"}, r"parallel\.runner: Input should be 'processes' or 'dask'"),
        ({"workers": -1}, r"parallel\.workers: Input should be greater than or equal to 0"),
        ({"items_per_task": 0}, r"parallel\.items_per_task: Input should be greater than 0"),
        ({"address": "tcp://h:8786"}, r"parallel\.address: a scheduler address needs runner: dask"),
        ({"runner": "dask", "address": " "}, r"parallel\.address: empty"),
        ({"threads": 2}, r"parallel\.threads: unknown key"),
    ],
)
def test_bad_params_name_the_key(change, message):
    with pytest.raises(ParamsError, match=message):
        config(**change)


def test_repository_params_parse():
    parse(ParallelConfig, "parallel", yaml.safe_load((REPO / "params.yaml").read_text())["parallel"])


@pytest.mark.parametrize("maxcount,maxsize", [(7, 10**9), (1000, 4000), (6, 3000)])  # by count, size, both
def test_planned_shards_are_the_shards_shardwriter_writes(serial_run, tmp_path, maxcount, maxsize):
    """The plan cuts where webdataset's ShardWriter cuts one stream: the tars and index are the same bytes."""
    resized = serial_run["resized"]
    cfg = parse(shard.ShardConfig, "shard", {"maxcount": maxcount, "maxsize": maxsize})
    shard.run_shard(resized, tmp_path / "planned", cfg)
    images, queries = manifest.read(resized)
    splits = sorted(set(images.column("split").to_pylist()))
    path_of = dict(zip(images.column("image_id").to_pylist(), images.column("path").to_pylist()))
    images_of, queries_of = shard.rows_by_split(images, splits), shard.rows_by_split(queries, splits)
    index = {"format": store.INDEX_FORMAT, "splits": {split: {
        "gallery": store.write_shards(tmp_path / "stream", split, "gallery",
                                       shard.gallery_samples(images_of[split], resized, None), maxcount, maxsize),
        "queries": store.write_shards(tmp_path / "stream", split, "queries",
                                       shard.query_samples(queries_of[split], path_of, resized), maxcount, maxsize),
    } for split in splits}}
    planned = tree(tmp_path / "planned")
    planned_index = json.loads(planned.pop("index.json"))
    # the dataset's evaluation declaration is copied beside the shards unchanged (not part of the streamed tars)
    entry, declared = planned_index.pop("evaluation"), planned.pop("evaluation.json")
    assert declared == (resized / "evaluation.json").read_bytes()
    assert entry == {"file": "evaluation.json", "sha256": hashlib.sha256(declared).hexdigest()}
    assert planned_index == index
    assert planned == tree(tmp_path / "stream")


# --- the process pool (no Prefect) ---------------------------------------------------------------


def test_process_pool_keeps_item_order():
    results = map_items(pid_of, range(12), config(workers=2, items_per_task=3), "pids")
    assert [x for x, _ in results] == list(range(12))
    assert os.getpid() not in {pid for _, pid in results}  # every item ran in a worker process


def test_a_process_pool_writes_the_serial_bytes(serial_run, tmp_path):
    """prepare, resize and shard on 2 processes (the default runner) == in one process."""
    pool_run = run_stages(tmp_path, write_params(tmp_path / "params.yaml", POOL))
    for stage in ("prepared", "resized", "shards"):
        assert tree(pool_run[stage]) == tree(serial_run[stage]), stage


# --- Dask through Prefect's task runner -------------------------------------------------------------


def test_a_local_dask_cluster_writes_the_serial_bytes(prefect_api, serial_run, tmp_path):
    """prepare, resize and shard on a 2-worker LocalCluster (runner dask, address null) == in one process."""
    params = write_params(tmp_path / "params.yaml", DASK_LOCAL)
    dask_run = run_stages(tmp_path, params)
    for stage in ("prepared", "resized", "shards"):
        assert tree(dask_run[stage]) == tree(serial_run[stage]), stage
    store.verify(dask_run["shards"])


def test_a_running_scheduler_named_by_address_is_used(prefect_api, serial_run, scheduler, tmp_path):
    finished = scheduler.scheduler.plugins[FinishedTasks.name]
    before = finished.count
    params = write_params(tmp_path / "params.yaml", {**DASK_LOCAL, "address": scheduler.scheduler_address})
    dask_run = run_stages(tmp_path, params, prepared=serial_run["prepared"])
    images = manifest.read(serial_run["prepared"])[0].num_rows
    tars = sum(len(k["shards"]) for s in store.read_index(dask_run["shards"])["splits"].values() for k in s.values())
    per_task = DASK_LOCAL["items_per_task"]  # one Prefect task = one Dask task on the scheduler
    assert finished.count - before == math.ceil(images / per_task) + math.ceil(tars / per_task)
    for stage in ("resized", "shards"):
        assert tree(dask_run[stage]) == tree(serial_run[stage]), stage


def test_a_failing_item_is_named_by_the_process_pool():
    with pytest.raises(ValueError, match=r"math domain error") as error:
        map_items(math.sqrt, [4.0, 9.0, -1.0, 16.0, 25.0], config(workers=2, items_per_task=2), "roots")
    assert error.value.__notes__ == ["while running roots: item 3 of 5 (-1.0)"]


def test_bad_input_on_a_dask_worker_is_one_stage_error_naming_the_item(prefect_api, scheduler):
    cfg = config(runner="dask", address=scheduler.scheduler_address, items_per_task=2)
    with pytest.raises(StageError, match=r"^squares: item 4 of 8 \(3\): three is bad input$"):
        map_items(fussy_square, range(8), cfg, "squares")


def test_a_dataloader_worker_forked_after_a_flow_here_exits_cleanly(prefect_api):
    """A flow run in this process starts Prefect's API log worker, whose at-exit hook failed every forked child at
    exit (tests/conftest.py drops it in children): a 2-worker DataLoader then raised 'exited unexpectedly' at its
    end, failing whichever DataLoader test came after this module in the same process."""
    import torch
    from prefect import flow

    @flow(persist_result=False)
    def one() -> int:
        return 1

    assert one() == 1
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=None, num_workers=2)
    assert list(loader) == list(range(8))
