"""Pipeline outputs (shards and a model) on a DVC remote, with the real `dvc push` / `dvc pull` in a tiny
copy of the repository, a local-directory remote standing in for S3 (see docs/storage.md)."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from stages.shards import store
from tiny_repo import make_tiny_repo, run, set_param

OUTPUTS = ("data/shards", "data/vocab", "data/pretrain")
UP_TO_PRETRAIN = ["--with-deps", "pretrain"]  # the stages that ran (prepare ... pretrain), not mine/train/evaluate


def digests(repo: Path) -> dict[str, str]:
    """sha256 of every file of the outputs, by path relative to the repository."""
    return {path.relative_to(repo).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for out in OUTPUTS for path in sorted((repo / out).rglob("*")) if path.is_file()}


def remove_outputs_and_cache(repo: Path) -> None:
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """(tiny repo after `dvc repro pretrain` and `dvc push` to a local-directory remote, remote, digests)."""
    repo = make_tiny_repo(tmp_path_factory.mktemp("repo"))
    set_param(repo, "pretrain", "steps", 4)
    run(["dvc", "repro", "pretrain"], repo)
    remote = tmp_path_factory.mktemp("remote")
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], repo)
    run(["dvc", "push", *UP_TO_PRETRAIN], repo)
    assert json.loads(run(["dvc", "status", "--cloud", "--json", *UP_TO_PRETRAIN], repo).stdout) == {}
    return repo, remote, digests(repo)


def test_pull_restores_shards_and_model_byte_identical(pushed):
    repo, remote, before = pushed
    assert "data/shards/index.json" in before and "data/pretrain/model.pt" in before
    assert any(path.is_file() for path in remote.rglob("*"))
    remove_outputs_and_cache(repo)
    assert json.loads(run(["dvc", "status", "--json", *UP_TO_PRETRAIN], repo).stdout) != {}  # outputs gone

    run(["dvc", "pull", *UP_TO_PRETRAIN], repo)
    assert digests(repo) == before
    assert json.loads(run(["dvc", "status", "--json", *UP_TO_PRETRAIN], repo).stdout) == {}  # clean
    store.verify(repo / "data/shards")


def test_shards_stream_from_the_remote_through_dvc_fs_without_a_pull(pushed, monkeypatch):
    repo, _, before = pushed
    remove_outputs_and_cache(repo)
    monkeypatch.chdir(repo)  # dvc:// is DVCFileSystem on the repository in the current directory
    assert store.index_digest("dvc://data/shards") == before["data/shards/index.json"]
    gallery = list(store.iter_gallery("dvc://data/shards", "test"))
    assert len(gallery) == store.read_index("dvc://data/shards")["splits"]["test"]["gallery"]["count"] > 0
    assert not (repo / "data").exists()  # streamed from the remote: nothing checked out
