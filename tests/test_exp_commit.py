"""Workspace experiments in two worktrees of one Git repository at once (issue 23, item 4).

docs/parity.md's GA seed-0 run (`python -m pipelines.repro --recipe ... --set ...`, each stage a workspace
`dvc exp run`, beside another seed in a second worktree) failed at DVC's commit step with "'NoneType' object is
not subscriptable" after `evaluate` had written its metrics: DVC keeps a running workspace experiment's baseline in
refs/exps/exec/EXEC_BASELINE, which Git shares among worktrees, and the other worktree's experiment deleted it when
it ended. pipelines.common.dvc now gives such experiments one turn at a time across the worktrees
(workspace_experiment_lock). The repository here is one stage that waits to be told to finish, so the test decides
which experiment ends first: the one that started first, while the other would still be running.
"""
import threading
import time
from pathlib import Path

import yaml

from pipelines.common import dvc
from tiny_repo import run

STAGE = """\
import json, os, sys, time
from pathlib import Path

import yaml

Path(os.environ["STARTED"]).touch()
deadline = time.time() + 60
while not Path(os.environ["GO"]).exists():  # the test says when this experiment may end
    if time.time() > deadline:
        sys.exit("never told to finish")
    time.sleep(0.05)
x = yaml.safe_load(open("params.yaml"))["x"]
json.dump({"score": 10 * x}, open("metrics.json", "w"))
"""

DVC_YAML = {"stages": {"score": {"cmd": "python score.py", "deps": ["score.py"], "params": ["x"],
                                 "metrics": [{"metrics.json": {"cache": False}}]}}}


def make_repo(root: Path) -> Path:
    """A Git + DVC repository of one stage (score.py, params x, metrics.json), committed, and a second worktree."""
    root.mkdir()
    (root / "score.py").write_text(STAGE)
    (root / "params.yaml").write_text("x: 1\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one stage"]
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], commit, ["git", "worktree", "add", "-q", str(root.parent / "second")]):
        run(cmd, root)
    return root.parent / "second"


def wait_for(path: Path, seconds: float) -> bool:
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    return path.exists()


def test_workspace_experiments_in_two_worktrees_at_once_both_commit(tmp_path):
    main = tmp_path / "main"
    second = make_repo(main)
    results, threads = {}, {}

    def experiment(root: Path, name: str, x: int) -> None:
        signals = {"STARTED": str(tmp_path / f"{name}.started"), "GO": str(tmp_path / f"{name}.go")}
        results[name] = dvc(["exp", "run", "--name", name, "-S", f"x={x}"], root, env=signals)

    for root, name, x in ((main, "first", 2), (second, "second", 3)):
        threads[name] = threading.Thread(target=experiment, args=(root, name, x))
    began = time.perf_counter()
    threads["first"].start()
    assert wait_for(tmp_path / "first.started", 60), "the first experiment's stage never started"
    threads["second"].start()
    # without a turn the second worktree's stage starts now and is still running when the first experiment ends,
    # deletes the shared exec refs, and the second fails at its commit
    overlapped = wait_for(tmp_path / "second.started", 8)
    (tmp_path / "first.go").touch()
    threads["first"].join(120)
    (tmp_path / "second.go").touch()
    threads["second"].join(120)

    for name in ("first", "second"):
        result = results[name]
        assert result.returncode == 0, f"{name}: dvc exp run failed:\n{result.stdout}\n{result.stderr}"
    assert not overlapped, "the second worktree's experiment ran while the first's was running"
    # both are recorded (the refs are the repository's, whichever worktree ran them), each with its own params
    # and metrics
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], main).stdout.split()
    recorded = {ref.rsplit("/", 1)[-1]: ref for ref in refs if not ref.startswith("refs/exps/exec/")}
    assert set(recorded) >= {"first", "second"}, refs
    for name, x in (("first", 2), ("second", 3)):
        assert yaml.safe_load(run(["git", "show", f"{recorded[name]}:params.yaml"], main).stdout) == {"x": x}
        assert yaml.safe_load(run(["git", "show", f"{recorded[name]}:metrics.json"], main).stdout) == {"score": 10 * x}
    # and no experiment's state is left behind in the shared refs
    assert "refs/exps/exec/EXEC_BASELINE" not in refs
    print(f"two worktrees' experiments, one after the other: {time.perf_counter() - began:.1f} s")


def test_only_workspace_experiments_take_a_turn():
    from pipelines.common import is_workspace_experiment

    assert is_workspace_experiment(["exp", "run", "--single-item", "train", "-S", "train.lr=0.1"])
    assert not is_workspace_experiment(["exp", "run", "--temp", "--name", "a", "-S", "x=1"])  # pipelines.sweep
    assert not is_workspace_experiment(["exp", "run", "--queue", "-S", "x=1"])
    assert not is_workspace_experiment(["repro", "--single-item", "train"])
    assert not is_workspace_experiment(["exp", "show", "--json"])
