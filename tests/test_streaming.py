"""Shards read by URL: an HTTP server on 127.0.0.1 (curl, as WebDataset streams http), file://, and a
protocol WebDataset has no opener for (memory://, through fsspec) give what the local directory gives;
a missing or cut shard is an error naming it."""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
import yaml
from webdataset.gopen import gopen_curl, gopen_schemes

from stages.shards import store
from stages.common.errors import StageError
from stages.shards.loaders import training_batches
from stages.vocabulary import vocabulary
from test_loaders import data  # noqa: F401  (the module's tiny shapes shards, built by the real stages)
from tiny_repo import REPO, TINY, merge

BATCHES = 8  # 48 train queries in batches of 8: 6 an epoch, so the second epoch's reshuffle is compared too


@pytest.fixture
def served(data, server):  # noqa: F811
    """(base URL of a copy of the shards on the HTTP server, that copy, the paths requested)."""
    folder, base, requests = server
    shutil.copytree(data / "shards", folder / "shards")
    return f"{base}/shards", folder / "shards", requests


def batches(location, workers: int = 0, n: int = BATCHES, seed: int = 5) -> list[dict]:
    return list(itertools.islice(training_batches(location, "train", 8, 16, seed=seed, workers=workers), n))


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a["query_id"] == b["query_id"] and a["text"] == b["text"] and a["target_id"] == b["target_id"]
        assert torch.equal(a["ref"], b["ref"]) and torch.equal(a["tgt"], b["tgt"])


def test_location_tells_urls_from_paths():
    assert store.location("data/shards") == Path("data/shards")
    assert store.location(Path("/x/shards")) == Path("/x/shards")
    assert store.location("http://127.0.0.1:8000/shards/") == "http://127.0.0.1:8000/shards"
    assert store.location("s3://bucket/shards") == "s3://bucket/shards"
    assert store.location("file:///tmp/shards") == "file:///tmp/shards"


def test_webdataset_streams_http_with_curl_and_other_protocols_through_fsspec():
    assert gopen_schemes["http"] is gopen_curl and gopen_schemes["https"] is gopen_curl
    for protocol in ("s3", "gcs", "az", "memory", "dvc"):
        assert gopen_schemes[protocol] is store._gopen_fsspec


def test_training_batches_from_http_equal_the_local_ones(data, served):  # noqa: F811
    url, _, requests = served
    assert_same_batches(batches(url), batches(data / "shards"))
    assert "/shards/index.json" in requests
    assert {f"/shards/{s.split('/shards/')[1]}" for s in store.shard_paths(url, "train", "queries")} <= set(requests)


def test_training_batches_from_http_in_worker_processes_equal_the_local_ones(data, served):  # noqa: F811
    url, _, _ = served
    assert_same_batches(batches(url, workers=2, n=3), batches(data / "shards", workers=2, n=3))


def test_gallery_queries_captions_and_digest_from_http_equal_the_local_ones(data, served):  # noqa: F811
    url, _, _ = served
    local = data / "shards"
    assert store.shard_paths(url, "test", "gallery")[0].startswith(f"{url}/test/gallery-")
    assert list(store.iter_gallery(url, "test")) == list(store.iter_gallery(local, "test"))
    assert list(store.iter_queries(url, "novel")) == list(store.iter_queries(local, "novel"))
    assert list(store.iter_captions(url, "train")) == list(store.iter_captions(local, "train"))
    assert store.read_index(url) == store.read_index(local)
    assert store.index_digest(url) == store.index_digest(local) == store.file_sha256(local / "index.json")
    assert store.read_folds(url) is None
    store.verify(url)


def test_a_missing_shard_on_the_server_is_an_error_naming_its_url(served):
    url, copy, _ = served
    gone = store.shard_paths(url, "train", "queries")[1]
    (copy / "train" / gone.rsplit("/", 1)[1]).unlink()
    expected = f"{gone}: shard listed in index.json is missing (HTTP 404)"
    with pytest.raises(StageError, match=re.escape(expected)):
        list(store.iter_queries(url, "train"))
    with pytest.raises(StageError, match=re.escape(expected)):
        store.verify(url)
    with pytest.raises(StageError, match=re.escape(gone)):  # every epoch reads every shard: the first one fails
        batches(url, n=6)
    with pytest.raises(StageError, match=re.escape(gone)):  # raised in a DataLoader worker, re-raised here
        batches(url, workers=2, n=6)


def test_a_missing_index_or_server_is_an_error_naming_the_url(served):
    url, _, _ = served
    with pytest.raises(StageError, match=rf"{url}/nothing/index.json: missing \(HTTP 404\) \(did the shard stage"):
        store.read_index(f"{url}/nothing")
    with pytest.raises(StageError, match=r"http://127.0.0.1:9/shards/index.json: unreadable \(ClientConnectorError"):
        store.index_digest("http://127.0.0.1:9/shards")


def test_a_shard_cut_at_a_sample_boundary_is_an_error_not_a_short_epoch(data, served):  # noqa: F811
    import tarfile

    url, copy, _ = served
    shard = store.shard_paths(url, "train", "queries")[0]
    path = copy / "train" / shard.rsplit("/", 1)[1]
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    second_sample = next(m for m in members if m.name.split(".")[0] != members[0].name.split(".")[0])
    path.write_bytes(path.read_bytes()[:second_sample.offset] + bytes(1024))  # a valid, shorter tar
    count = store.read_index(copy)["splits"]["train"]["queries"]["shards"][0]["count"]
    with pytest.raises(StageError, match=re.escape(f"{shard}: read 1 samples where index.json counts {count}")):
        list(store.iter_queries(url, "train"))
    with pytest.raises(StageError, match=re.escape(shard)):
        batches(url, n=6)


def test_a_file_url_reads_like_the_local_directory(data):  # noqa: F811
    url = (data / "shards").resolve().as_uri()
    assert url.startswith("file:///")
    assert list(store.iter_gallery(url, "test")) == list(store.iter_gallery(data / "shards", "test"))
    assert_same_batches(batches(url, n=2), batches(data / "shards", n=2))


def test_a_protocol_without_a_webdataset_opener_streams_through_fsspec(data):  # noqa: F811
    fs = fsspec.filesystem("memory")
    fs.put(str(data / "shards"), "/streaming-test/shards", recursive=True)
    try:
        url = "memory://streaming-test/shards"
        assert list(store.iter_queries(url, "test")) == list(store.iter_queries(data / "shards", "test"))
        gone = store.shard_paths(url, "test", "gallery")[0]
        fs.rm(gone)
        with pytest.raises(StageError, match=re.escape(f"{gone}: shard listed in index.json is missing")):
            list(store.iter_gallery(url, "test"))
    finally:
        fs.rm("/streaming-test", recursive=True)


def test_vocabulary_and_pretrain_stages_read_shards_over_http(data, served, tmp_path):  # noqa: F811
    """The real `python -m stages.pretrain --shards http://...` for a few steps."""
    url, _, requests = served
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    params["pretrain"].update(steps=3, batch_size=8, shuffle_buffer=16, workers=0, device="cpu",
                              checkpoint_every=2, log_every=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    vocabulary(url, tmp_path / "vocab", tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "stages.pretrain", "--shards", f"{url}/", "--vocab", "vocab",
                             "--out", "pretrain", "--metrics", "pretrain.json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "pretrain.json").read_text())["steps"] == 3
    assert (tmp_path / "pretrain" / "model.pt").is_file()
    assert any(r.startswith("/shards/train/queries-") for r in requests)

    result = subprocess.run([sys.executable, "-m", "stages.pretrain", "--shards", f"{url}/missing", "--vocab",
                             "vocab", "--out", "pretrain2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert f"error: {url}/missing/index.json: missing (HTTP 404)" in result.stderr
