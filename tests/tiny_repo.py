"""A tiny copy of this repository (tiny params), for tests that run the real DVC and Prefect."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "resize", "shard", "vocabulary", "pretrain", "mine", "train", "evaluate", "index"]
TINY = {
    "dataset": {"shapes": {"image_size": 40, "train_queries": 240, "test_queries": 60, "novel_queries": 60,
                            "eval_gallery_size": 0, "val_queries": 20, "val_gallery_size": 60}},
    "parallel": {"workers": 1},  # tests/test_parallel.py runs prepare/resize/shard in parallel
    "resize": {"size": 32},
    "shard": {"maxcount": 100},
    "model": {"embed_dim": 32, "image": {"channels": [8, 16]}, "text": {"embed_dim": 16, "hidden_dim": 16}},
    "pretrain": {"steps": 12, "batch_size": 16, "checkpoint_every": 5, "log_every": 4, "workers": 0, "eval_every": 6},
    "mine": {"k": 5, "batch_size": 64},
    "train": {"steps": 6, "batch_size": 16, "checkpoint_every": 5, "log_every": 2, "workers": 0, "eval_every": 3},
    "evaluate": {"ks": [1, 5, 10], "batch_size": 64, "whm": {"weights": [1.0, 1.0, 1.0]}},
}


def merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) else value
    return out


def model_params(**changes) -> dict:
    """The `model` section of params.yaml with `changes` merged in (nested dicts merge key by key)."""
    import copy

    import yaml

    base = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text())["model"])
    base["name"] = "tirg"  # params.yaml says auto: the composed default, resolved as the stages resolve it
    return merge(base, changes)


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


def make_tiny_repo(dest: Path) -> Path:
    """Copy the working tree to `dest`, shrink params.yaml and commit it there."""
    copy_repository(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        run(cmd, dest)
    return dest


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
