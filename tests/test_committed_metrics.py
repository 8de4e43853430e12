"""The metrics committed on main say where they come from: an uninterrupted, from-scratch run of committed code, the
files dvc.lock records, the evaluated model the trained one."""
import hashlib
import json
import re
import subprocess

import yaml

from tiny_repo import REPO

STAGES = ("pretrain", "train", "evaluate")


def provenance(stage: str) -> dict:
    return json.loads((REPO / "metrics" / f"{stage}.json").read_text())["provenance"]


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def test_the_committed_metrics_come_from_an_uninterrupted_run_of_a_clean_commit():
    for stage in STAGES:
        block = provenance(stage)
        assert block["code"]["dirty"] is False, f"metrics/{stage}.json: run on a tree with uncommitted changes"
        commit = block["code"]["commit"]
        assert re.fullmatch(r"[0-9a-f]{40}", commit), f"metrics/{stage}.json: no code commit"
        if git("rev-parse", "--is-shallow-repository").stdout.strip() == "false":
            assert git("merge-base", "--is-ancestor", commit, "HEAD").returncode == 0, \
                f"metrics/{stage}.json: code commit {commit} is not in this branch's history"
        if stage != "evaluate":
            assert block["resumed"] is False and block["resumed_from_step"] is None, \
                f"metrics/{stage}.json: from a resumed run"
        assert block["threads"] >= 1 and block["cpu"] and block["versions"]["torch"]
    assert provenance("evaluate")["model_sha256"] == provenance("train")["model_sha256"]


def test_dvc_lock_records_the_committed_metrics_files():
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    recorded = {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}
    for stage in STAGES:
        path = f"metrics/{stage}.json"
        assert recorded[path] == hashlib.md5((REPO / path).read_bytes()).hexdigest(), \
            f"{path} is not the file dvc.lock records: commit the two from one run"
