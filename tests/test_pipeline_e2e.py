"""The real `dvc repro` on a tiny params set, in a temporary copy of the repository."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "resize", "shard", "pretrain", "mine", "train", "evaluate"]

TINY = {
    "dataset": {"shapes": {"image_size": 40, "train_queries": 240, "test_queries": 60, "novel_queries": 60}},
    "resize": {"size": 32, "workers": 2},
    "shard": {"maxcount": 100},
    "model": {"embed_dim": 32, "image": {"channels": [8, 16]}, "text": {"embed_dim": 16, "hidden_dim": 16}},
    "pretrain": {"steps": 12, "batch_size": 16, "checkpoint_every": 5, "log_every": 4, "workers": 0},
    "mine": {"k": 5, "batch_size": 64},
    "train": {"steps": 6, "batch_size": 16, "checkpoint_every": 5, "log_every": 2, "workers": 0},
    "evaluate": {"ks": [1, 5, 10], "batch_size": 64},
}


def merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) else value
    return out


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def copy_repository(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a commit of the working tree would hold."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    for name in ("dvc.lock", "metrics"):
        path = dest / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    dest = tmp_path_factory.mktemp("clone")
    copy_repository(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        run(cmd, dest)
    return dest, run(["dvc", "repro"], dest)


def test_dvc_repro_runs_every_stage_then_skips_them(tiny_repo):
    tiny_repo, first = tiny_repo
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout, first.stdout

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], tiny_repo).stdout)
    values = metrics[""]["data"]["metrics/evaluate.json"]["data"]
    for split in ("test", "novel", "harmonic"):
        assert set(values["tirg"][split]) == {"r1", "r5", "r10"}
        assert all(0 <= v <= 100 for v in values["tirg"][split].values())
    assert values["counts"]["test"]["queries"] == 60
    assert (tiny_repo / "data/pretrain/live/plots/metrics/loss.tsv").exists()

    second = run(["dvc", "repro"], tiny_repo)
    assert "Running stage" not in second.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout, second.stdout


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stages_run(stdout: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in stdout]


def test_changing_train_params_reruns_only_train_and_evaluate(tiny_repo):
    tiny_repo, _ = tiny_repo
    set_param(tiny_repo, "train", "lr", 0.02)
    assert stages_run(run(["dvc", "repro"], tiny_repo).stdout) == ["train", "evaluate"]


def test_changing_resize_size_reruns_from_resize_on(tiny_repo):
    tiny_repo, _ = tiny_repo
    set_param(tiny_repo, "resize", "size", 24)
    result = run(["dvc", "repro"], tiny_repo)
    assert stages_run(result.stdout) == STAGES[1:], result.stdout


def test_a_bad_param_stops_the_stage_naming_the_key(tiny_repo):
    tiny_repo, _ = tiny_repo
    set_param(tiny_repo, "mine", "k", 0)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "stages.mine", "--model", "data/pretrain/model.pt",
                             "--shards", "data/shards", "--out", "data/mined/negatives.parquet"],
                            cwd=tiny_repo, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "params.yaml: mine.k: Input should be greater than 0" in result.stderr
