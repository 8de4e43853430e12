"""What the flows share: the `orchestration` params, the DVC stage graph, and running DVC commands."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydantic import Field
from typing_extensions import Annotated

from stages.common.params import load, require, section


@section
class OrchestrationConfig:
    retries: Annotated[int, Field(ge=0)]
    retry_delay_seconds: Annotated[float, Field(ge=0)]
    parallel: Annotated[int, Field(gt=0)]
    schedule: Optional[str]

    def __post_init__(self):
        require(self.schedule is None or len(self.schedule.split()) == 5, "schedule",
                f"must be a 5-field cron expression or null, got {self.schedule!r}")


def load_orchestration(root: Path) -> OrchestrationConfig:
    return load(OrchestrationConfig, "orchestration", Path(root) / "params.yaml")


@dataclass(frozen=True)
class Stage:
    name: str
    metrics: tuple[str, ...]  # metrics files the stage writes, relative to the repository root


def stages_in_order(root: Path) -> list[Stage]:
    """The stages of the DVC graph, dependencies first (ties in dvc.yaml order), read from DVC itself."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        position = {stage: i for i, stage in enumerate(stages)}
        # DVC's edges point from a stage to the stages it depends on
        order = nx.lexicographical_topological_sort(repo.index.graph.reverse(copy=True), key=position.__getitem__)
        return [Stage(_address(s, Path(repo.root_dir)), tuple(str(o.def_path) for o in s.outs if o.metric))
                for s in order]


def _address(stage, root: Path) -> str:
    """What `dvc repro` takes, relative to the repository root: `train`, or `sub/dvc.yaml:train`."""
    path = Path(stage.path).relative_to(root)
    name = getattr(stage, "name", None)
    if name is None:  # a .dvc file
        return str(path)
    return name if str(path) == "dvc.yaml" else f"{path}:{name}"


def parse_overrides(items: list[str] | None) -> list[str]:
    """`--set key=value` items, checked; passed to DVC as `-S key=value`."""
    overrides = list(items or [])
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key or " " in key:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. train.lr=0.01")
    return overrides


def dvc(args: list[str], root: Path, stream: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `dvc ARGS` in `root` with this interpreter's environment first on PATH (its dvc, its python), plus `env`
    (e.g. CUDA_VISIBLE_DEVICES for one experiment).

    With `stream`, stdout and stderr are merged and every line (a progress bar's `\r` updates too) is handed to
    `stream` as it comes: a long stage shows in the flow run's log while it runs. The result's stdout then holds
    the merged text and stderr is empty.

    A workspace experiment (`exp run` without --temp or --queue) waits for any other that a flow runs in another
    worktree of the same Git repository (workspace_experiment_lock)."""
    env = {**os.environ, **(env or {}),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    executable = shutil.which("dvc", path=env["PATH"])
    if executable is None:
        raise FileNotFoundError("no `dvc` executable beside this Python or on PATH (run `make setup`)")
    turn = workspace_experiment_lock(root, stream) if is_workspace_experiment(args) else nullcontext()
    with turn:
        return _run(executable, args, root, env, stream)


def _run(executable: str, args: list[str], root: Path, env: dict[str, str],
         stream: Callable[[str], None] | None) -> subprocess.CompletedProcess:
    if stream is None:
        return subprocess.run([executable, *args], cwd=root, env=env, capture_output=True, text=True)
    lines = []
    with subprocess.Popen([executable, *args], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:  # text mode reads "\r" as a line end too
        for line in process.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if line.strip():
                stream(line)
    return subprocess.CompletedProcess(process.args, process.returncode, "\n".join(lines), "")


WORKSPACE_EXP_LOCK = "cirflow-workspace-exp.lock"  # in Git's common directory: one for all worktrees


def is_workspace_experiment(args: list[str]) -> bool:
    """Whether `dvc ARGS` runs an experiment in the workspace itself (not in a temporary copy, not queued)."""
    return args[:2] == ["exp", "run"] and not {"--temp", "--queue", "--run-all"} & set(args)


@contextmanager
def workspace_experiment_lock(root: Path, stream: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the one turn that all worktrees of `root`'s Git repository share for a workspace `dvc exp run`.

    DVC keeps a running workspace experiment's state in Git refs, refs/exps/exec/EXEC_BASELINE and its
    siblings, and Git shares every ref under refs/ among the worktrees of a repository. When one worktree's
    experiment ends, DVC deletes those refs while another worktree's may still be running; that one then fails at
    its commit step with "'NoneType' object is not subscriptable" (ExpRefInfo(None, name): its baseline ref is
    gone), after its stages have run. DVC's own locks are in each worktree's .dvc/tmp and do not see the other
    worktree (treeverse/dvc#5456: experiments in git worktrees are unsupported). So a flow's workspace experiment
    waits here, on a flock in Git's common directory, until no other worktree's is running; `stream` (else
    stderr) is told whom it waits for. Experiments with --temp (pipelines.sweep) each run in their own temporary
    repository with their own refs and need no turn. Outside a Git repository nothing is held."""
    import fcntl

    found = subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=root, capture_output=True, text=True)
    if found.returncode != 0:
        yield
        return
    path = (Path(root) / found.stdout.strip()) / WORKSPACE_EXP_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text().strip() or "unknown"
            (stream or (lambda line: print(line, file=sys.stderr)))(
                f"waiting for the workspace experiment of another worktree of this Git repository ({holder}): "
                "DVC shares a running experiment's refs among worktrees, so they take turns")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} in {Path(root).resolve()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def remove_stale_locks(root: Path) -> list[str]:
    """Drop the entries of DVC's `.dvc/tmp/rwlock` whose process is gone: no such PID, a zombie (a `kill -9`ed
    dvc its parent never reaped) or a PID reused by another program. DVC itself drops only PIDs that do not
    exist, so a zombie or a reused PID blocks every later `dvc repro` ("... is busy, it is being blocked by").
    A lock held by a live dvc is kept. Returns one line per removed entry."""
    import psutil
    from dvc.fs import localfs
    from dvc.rwlock import _edit_rwlock  # DVC's own guarded read-modify-write of the file (no public API)

    lock_dir = Path(root) / ".dvc" / "tmp"
    if not (lock_dir / "rwlock").is_file():
        return []

    def alive(info: dict) -> bool:
        try:
            process = psutil.Process(int(info["pid"]))
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            return " ".join(process.cmdline()).endswith(info["cmd"].split(" ", 1)[-1])
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return False

    removed = []
    with _edit_rwlock(str(lock_dir), localfs, False) as lock:
        for path, info in list(lock["write"].items()):
            if not alive(info):
                removed.append(f"write lock on {path} (PID {info['pid']}: {info['cmd']})")
                del lock["write"][path]
        for path, infos in list(lock["read"].items()):
            kept = [info for info in infos if alive(info)]
            removed += [f"read lock on {path} (PID {i['pid']}: {i['cmd']})" for i in infos if i not in kept]
            if kept:
                lock["read"][path] = kept
            else:
                del lock["read"][path]
    return removed


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def shown_experiments(root: Path, names: set[str]) -> dict[str, dict]:
    """{experiment name: its `data` in `dvc exp show --json --all-commits` (params and metrics per file);
    all commits, so a sweep that outlives a commit still finds its first experiments."""
    import json

    shown = dvc(["exp", "show", "--json", "--all-commits"], root)
    if shown.returncode != 0:
        raise RuntimeError(f"dvc exp show failed:\n{tail(shown.stderr)}")
    return {rev["name"]: rev["data"]
            for baseline in json.loads(shown.stdout)
            for experiment in baseline.get("experiments") or []
            for rev in experiment["revs"]
            if rev.get("name") in names and rev.get("data")}


def experiment_rows(root: Path, names: set[str]) -> dict[str, dict[str, object]]:
    """{experiment name: its flattened params (`params.<key>`) and metrics (`<metrics file stem>.<key>`)} from
    `dvc exp show --json`: the columns the sweep CSV stores and pipelines.report reads."""
    from pipelines.repro import flatten

    found = {}
    for name, data in shown_experiments(root, names).items():
        params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
        row = {f"params.{k}": v for k, v in flatten(params).items()}
        for path, content in (data.get("metrics") or {}).items():
            row.update({f"{Path(path).stem}.{k}": v for k, v in flatten(content.get("data") or {}).items()})
        found[name] = row
    return found


def param_value(value) -> str:
    """A params value as the text `dvc exp run -S key=<text>` takes (YAML flow style)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
