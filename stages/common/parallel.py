"""Parallelism of the data stages (prepare, resize, shard): a process pool here, or a Dask cluster through
Prefect's task runner.

`map_items(fn, items, cfg, desc)` is `[fn(item) for item in items]`, run as the `parallel` section of
params.yaml says:

    runner: processes   `workers` processes on this machine (concurrent.futures.ProcessPoolExecutor)
    runner: dask        one Prefect flow whose task runner is prefect_dask's DaskTaskRunner: with
                        `address: null` a temporary distributed.LocalCluster of `workers` processes (one
                        thread each), else the running Dask scheduler at `address` (its workers do the
                        work; `workers` is not used)

Items go to tasks `items_per_task` at a time (locally: fewer, so that every worker gets some), results
come back in item order, whatever order the tasks finish in. The output of a stage is therefore the same
byte for byte whatever the runner and worker count (tests/test_parallel.py), which is why the section is
not a DVC param of the stages: moving a run to a cluster does not rerun them. With one worker, or one
item, nothing is started: `fn` runs here, in order.

Why not Prefect for the processes on this machine too: Prefect needs an API, and its temporary server
takes ~8 s to start, a pool with Prefect imported in its workers ~3 s more, and every task adds ~0.2 s of
API calls (measured on a busy 2-core machine), while an image takes ~5 ms to resize. On one machine the
pool is the whole job; on a cluster Prefect's runner brings the scheduling, the task states in the UI and
the retries of a flow.

Prefect in ephemeral mode (PREFECT_API_URL unset): the temporary server that Prefect starts in this
process anyway is started first and handed to the workers on this machine, which would otherwise each
start their own. The workers of a Dask cluster on other hosts keep their own settings: give them a
Prefect server they can reach (PREFECT_API_URL), the repository's Python environment and the data
folders at the same paths (the stages hand them absolute paths).

A failing item stops the run with an error that names the item: a bad input (StageError,
ManifestError, ParamsError, FileNotFoundError) becomes one StageError line for the stage's CLI,
any other exception keeps its type and gets a note naming the item (shown with its traceback).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Literal, Optional, TypeVar
from urllib.parse import urlsplit

from pydantic import Field
from tqdm import tqdm
from typing_extensions import Annotated

from stages.common.errors import StageError
from stages.common.errors import ManifestError
from stages.common.params import ParamsError, require, section

T = TypeVar("T")
R = TypeVar("R")
# What a stage reports as bad input (stages.common.errors.run_stage): re-raised as one StageError naming the item.
INPUT_ERRORS = (StageError, ManifestError, ParamsError, FileNotFoundError)
LABEL_CHARS = 200
LOOPBACK_HOSTS = {"localhost", "::1"}


@section
class ParallelConfig:
    runner: Literal["processes", "dask"]
    workers: Annotated[int, Field(ge=0)]  # processes / local Dask workers; 0 = os.cpu_count()
    address: Optional[str]  # runner dask: a running scheduler, e.g. tcp://host:8786; null = a LocalCluster
    items_per_task: Annotated[int, Field(gt=0)]

    def __post_init__(self):
        require(self.address is None or self.runner == "dask", "address",
                f"a scheduler address needs runner: dask (got runner: {self.runner})")
        require(self.address is None or bool(self.address.strip()), "address", "empty; null = a local cluster")


SERIAL = ParallelConfig(runner="processes", workers=1, address=None, items_per_task=64)


def plan(cfg: ParallelConfig, count: int) -> tuple[int, int]:
    """(workers, items per task) for `count` items; workers 1 = run here."""
    if count <= 1:
        return 1, max(count, 1)
    if cfg.address is not None:
        return 0, cfg.items_per_task  # the cluster's workers, however many it has
    workers = min(cfg.workers or os.cpu_count() or 1, count)
    per_task = min(cfg.items_per_task, math.ceil(count / workers))
    return min(workers, math.ceil(count / per_task)), per_task


def map_items(fn: Callable[[T], R], items: Sequence[T], cfg: ParallelConfig, desc: str,
              label: Callable[[T], str] = repr, unit: str = "item") -> list[R]:
    """[fn(item) for item in items], in parallel as `cfg` says (see the module doc).

    `fn` and `label` (how an error names an item) must be picklable (module-level functions,
    functools.partial of them), as must the items and results."""
    items = list(items)
    workers, per_task = plan(cfg, len(items))
    where = "here" if workers == 1 else f"dask {cfg.address}" if cfg.address else f"{workers} {cfg.runner}"
    with tqdm(total=len(items), desc=f"{desc} ({where})", unit=unit, disable=None) as bar:
        if workers == 1:
            return run_batch(fn, items, 0, len(items), desc, label, bar.update)
        batches = [items[start:start + per_task] for start in range(0, len(items), per_task)]
        if cfg.runner == "processes":
            results = _run_pool(fn, batches, per_task, len(items), desc, label, workers, bar)
        else:
            with api_for_workers(cfg.address):
                results = _run_flow(fn, batches, per_task, len(items), desc, label, _task_runner(cfg, workers), bar)
    return [result for batch in results for result in batch]


def _run_pool(fn, batches, per_task, total, desc, label, workers, bar) -> list[list]:
    with ProcessPoolExecutor(workers) as pool:
        index = {pool.submit(run_batch, fn, batch, i * per_task, total, desc, label): i
                 for i, batch in enumerate(batches)}
        results: list = [None] * len(batches)
        try:
            for future in as_completed(index):  # the first failure stops the run, not the last
                i = index[future]
                results[i] = future.result()
                bar.update(len(batches[i]))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def run_batch(fn: Callable[[T], R], batch: Sequence[T], start: int, total: int, desc: str,
              label: Callable[[T], str], done: Callable[[int], object] | None = None) -> list[R]:
    """fn over one batch of items (item `start` onwards of `total`); an error names its item."""
    results = []
    for offset, item in enumerate(batch):
        try:
            results.append(fn(item))
        except Exception as err:
            name = _describe(item, label)
            where = f"{desc}: item {start + offset + 1} of {total} ({name})"
            if isinstance(err, INPUT_ERRORS):
                raise StageError(f"{where}: {err}") from err
            err.add_note(f"while running {where}")
            raise
        if done is not None:
            done(1)
    return results


def _describe(item: object, label: Callable[[object], str]) -> str:
    try:
        text = str(label(item))
    except Exception as err:  # the label must not hide the real error
        text = f"<label failed: {type(err).__name__}>"
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 3] + "..."


def _batch_task():
    """The Prefect task around run_batch, made on first use (importing prefect costs about a second)."""
    global _BATCH_TASK
    if _BATCH_TASK is None:
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        # NO_CACHE, no persisted results: items and results only travel between this process and the workers.
        _BATCH_TASK = task(run_batch, name="map-items", task_run_name="{desc}-{start}", cache_policy=NO_CACHE,
                           persist_result=False, retries=0)
    return _BATCH_TASK


_BATCH_TASK = None


def _task_runner(cfg: ParallelConfig, workers: int):
    from prefect_dask import DaskTaskRunner

    if cfg.address is not None:
        return DaskTaskRunner(address=cfg.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def _run_flow(fn, batches, per_task, total, desc, label, runner, bar) -> list[list]:
    from prefect import flow
    from prefect.futures import as_completed

    # No flow parameters: the items would be validated and sent to the Prefect API as the flow run's parameters.
    @flow(name=f"cirflow-{desc.replace(' ', '-')}", task_runner=runner, persist_result=False,
          validate_parameters=False)
    def map_items_flow() -> list[list]:
        task = _batch_task()
        index = {task.submit(fn, batch, i * per_task, total, desc, label): i for i, batch in enumerate(batches)}
        results: list = [None] * len(batches)
        for future in as_completed(list(index)):  # the first failure stops the flow, not the last
            i = index[future]
            results[i] = future.result()
            bar.update(len(batches[i]))
        return results

    return map_items_flow()


@contextmanager
def api_for_workers(address: str | None) -> Iterator[None]:
    """In Prefect's ephemeral mode, start its temporary server here and point the workers on this
    machine at it (through the settings that the task runners pass to their workers). `address`: the Dask
    scheduler (None: a LocalCluster); a scheduler on another host gets nothing (see the module doc).
    Also used by pipelines.sweep --dask."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    remote = address is not None and not _is_loopback(address)
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or remote:
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect's own client would start in this process
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _is_loopback(address: str) -> bool:
    """Whether a scheduler address (tcp://host:port, host:port) is on this machine's loopback interface."""
    host = (urlsplit(address if "://" in address else f"tcp://{address}").hostname or "").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")
