"""The real `dvc repro` on a tiny params set, in a temporary copy of the repository."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_repo import STAGES, make_tiny_repo, run, set_param


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    dest = make_tiny_repo(tmp_path_factory.mktemp("clone"))
    return dest, run(["dvc", "repro"], dest)


def test_dvc_repro_runs_every_stage_then_skips_them(tiny_repo):
    tiny_repo, first = tiny_repo
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout, first.stdout

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], tiny_repo).stdout)
    values = metrics[""]["data"]["metrics/evaluate.json"]["data"]
    composed = values["composed"]
    for split in ("test", "novel"):
        assert set(composed[split]["target"]) == {"r1", "r5", "r10", "queries", "gallery"}
        assert all(0 <= composed[split]["target"][f"r{k}"] <= 100 for k in (1, 5, 10))
    assert set(composed["harmonic"]["target"]) == {"r1", "r5", "r10"}
    assert composed["test"]["target"]["queries"] == 60
    whm, test, novel = composed["whm"]["target"], composed["test"]["target"], composed["novel"]["target"]
    assert set(whm) == {"r1", "r5", "r10"}  # whm.definition = splits: one value per recall level
    assert min(test["r10"], novel["r10"]) <= whm["r10"] <= max(test["r10"], novel["r10"])
    assert (tiny_repo / "data/live/pretrain/plots/metrics/loss.tsv").exists()
    for stage, steps in (("pretrain", ["6", "12"]), ("train", ["3", "6"])):  # validation recall on the val split
        logged = (tiny_repo / f"data/live/{stage}/plots/metrics/val_r10.tsv").read_text().splitlines()
        assert [row.split("\t")[0] for row in logged[1:]] == steps and all(
            0 <= float(row.split("\t")[-1]) <= 100 for row in logged[1:])
    pretrain_metrics = metrics[""]["data"]["metrics/pretrain.json"]["data"]
    assert {"val_r1", "val_r5", "val_r10", "val_r50", "val_r10_r50"} <= set(pretrain_metrics)
    index = json.loads((tiny_repo / "data/index/index.json").read_text())
    assert index["task"] == "composed" and set(index["splits"]) == {"test", "novel"}
    assert {"test.parquet", "novel.parquet"} <= {p.name for p in (tiny_repo / "data/evaluate").iterdir()}
    timing = metrics[""]["data"]["metrics/pretrain.json"]["data"]
    assert timing["steps"] == 12 and timing["seconds"] > 0

    second = run(["dvc", "repro"], tiny_repo)
    assert "Running stage" not in second.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout, second.stdout


def stages_run(stdout: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in stdout]


def test_changing_train_params_reruns_only_train_evaluate_and_index(tiny_repo):
    tiny_repo, _ = tiny_repo
    set_param(tiny_repo, "train", "lr", 0.02)
    assert stages_run(run(["dvc", "repro"], tiny_repo).stdout) == ["train", "evaluate", "index"]


def test_a_run_with_params_seen_before_is_restored_from_the_run_cache_with_its_curves(tiny_repo):
    """Sweep arms share runs through DVC's run-cache, which skips any stage with a `persist` output: train's
    curves are a plain cached output, restored with the model they belong to."""
    tiny_repo, _ = tiny_repo  # train.lr is 0.02 here (the test before); the first repro ran the committed value
    first_lr = yaml.safe_load(run(["git", "show", "HEAD:params.yaml"], tiny_repo).stdout)["train"]["lr"]
    assert first_lr != 0.02
    curve = tiny_repo / "data/live/train/plots/metrics/loss.tsv"
    at_002 = curve.read_text()
    for lr in (first_lr, 0.02):
        set_param(tiny_repo, "train", "lr", lr)
        result = run(["dvc", "repro"], tiny_repo)
        assert stages_run(result.stdout) == [], result.stdout
        assert "Stage 'train' is cached - skipping run, checking out outputs" in result.stdout, result.stdout
        assert (curve.read_text() == at_002) == (lr == 0.02)


def test_without_offline_negatives_mine_mines_nothing_and_train_reads_nothing(tiny_repo):
    tiny_repo, _ = tiny_repo
    set_param(tiny_repo, "train", "offline_negatives", False)
    try:
        result = run(["dvc", "repro"], tiny_repo)
        assert stages_run(result.stdout) == ["mine", "train", "evaluate", "index"], result.stdout
        assert sorted(p.name for p in (tiny_repo / "data/mined").iterdir()) == ["skipped.json"]
        assert "mine: nothing to mine (train.offline_negatives is false)" in result.stdout
        assert "no mined negatives" in result.stdout
    finally:
        set_param(tiny_repo, "train", "offline_negatives", True)
    run(["dvc", "repro"], tiny_repo)  # switched back on: mined again (or restored from DVC's run cache)
    assert sorted(p.name for p in (tiny_repo / "data/mined").iterdir()) == ["negatives.parquet"]


def test_changing_resize_size_reruns_from_resize_on(tiny_repo):
    tiny_repo, _ = tiny_repo
    set_param(tiny_repo, "resize", "size", 24)
    result = run(["dvc", "repro"], tiny_repo)
    assert stages_run(result.stdout) == STAGES[1:], result.stdout


def test_a_bad_param_stops_the_stage_naming_the_key(tiny_repo):
    tiny_repo, _ = tiny_repo
    set_param(tiny_repo, "mine", "k", 0)
    try:
        result = mine_directly(tiny_repo)
    finally:
        set_param(tiny_repo, "mine", "k", 5)
    assert result.returncode == 2
    assert "params.yaml: mine.k: Input should be greater than 0" in result.stderr


def mine_directly(tiny_repo):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "stages.mine", "--model", "data/pretrain/model.pt",
                           "--shards", "data/shards", "--out", "data/mined/negatives.parquet"],
                          cwd=tiny_repo, env=env, capture_output=True, text=True)


def test_gradient_augmentation_switches_on_from_params(tiny_repo):
    tiny_repo, _ = tiny_repo
    set_param(tiny_repo, "ga", "adversarial", True)
    set_param(tiny_repo, "ga", "isotropic", True)
    result = run(["dvc", "repro"], tiny_repo)
    assert stages_run(result.stdout) == ["pretrain", "mine", "train", "evaluate", "index"], result.stdout
    logged = (tiny_repo / "data/live/pretrain/plots/metrics/ga_adversarial.tsv").read_text().splitlines()
    assert len(logged) > 1 and all(float(row.split("\t")[-1]) > 0 for row in logged[1:])


def test_a_bad_evaluate_key_stops_the_first_stage_that_runs(tiny_repo):
    """Every stage checks the params of the stages after it: a bad `evaluate` value fails `pretrain` at its start,
    before any training, and names the key."""
    tiny_repo, _ = tiny_repo
    set_param(tiny_repo, "pretrain", "lr", 0.02)  # pretrain is the first stage to re-run
    set_param(tiny_repo, "evaluate", "ks", [10, 1])
    try:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(["dvc", "repro"], cwd=tiny_repo, env=env, capture_output=True, text=True)
    finally:
        set_param(tiny_repo, "evaluate", "ks", [1, 5, 10])
        set_param(tiny_repo, "pretrain", "lr", 0.01)
    assert result.returncode != 0
    assert "params.yaml: evaluate.ks: must be increasing and non-empty" in result.stdout + result.stderr
    assert "Running stage 'pretrain'" in result.stdout
    assert "Running stage 'mine'" not in result.stdout and not list(tiny_repo.glob("data/.pretrain.partial-*"))
    # DVC removed the stage's outputs before running it; the stage stopped before its loop made a new curve
    assert not (tiny_repo / "data/live/pretrain/plots/metrics").exists()
