"""Stage `shard` and the stages.shards library: WebDataset reads back exactly what was written."""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
import webdataset as wds
import yaml
from PIL import Image

from stages.datasets import manifest
from stages import shard
from stages.shards import store
from stages.common.errors import StageError
from stages.common.params import ParamsError, parse

REAL_IDS = [
    "women/dresses/casual_and_day_dresses/51727804/51727804_0.jpeg",
    "women/dresses/casual_and_day_dresses/51727804/51727804_1.jpeg",
    "B00006M009.jpg",
    "B00006M009",
    "B00006M009_jpg",
    "shirt.v2.final",
    "plain-id_7",
]


def image_bytes(shade: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 255 - shade, shade // 2)).save(buffer, fmt)
    return buffer.getvalue()


def write_resized(root: Path, images: list[tuple[str, str, str]], queries: list[tuple[str, str, str]]) -> Path:
    """A resized dataset: images (image_id, split, png|jpg), queries (query_id, reference_id, target_id)."""
    image_rows, split_of = [], {}
    for n, (image_id, split, ext) in enumerate(images):
        path = f"images/{n:04d}.{ext}"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(image_bytes(n * 7 % 256, "PNG" if ext == "png" else "JPEG"))
        image_rows.append({"image_id": image_id, "path": path, "split": split, "caption": f"caption of {image_id}"})
        split_of[image_id] = split
    query_rows = [
        {"query_id": qid, "split": split_of[ref], "reference_id": ref, "text": f"from {ref} to {tgt}", "target_id": tgt}
        for qid, ref, tgt in queries
    ]
    manifest.write(root, pa.Table.from_pylist(image_rows, schema=manifest.IMAGES_SCHEMA),
                   pa.Table.from_pylist(query_rows, schema=manifest.QUERIES_SCHEMA))
    return root


@pytest.fixture
def resized(tmp_path) -> Path:
    train = [(image_id, "train", "png" if n % 2 else "jpg") for n, image_id in enumerate(REAL_IDS)]
    test = [(f"test/{n}.png", "test", "png") for n in range(3)]
    queries = [(f"q.{n}/x", REAL_IDS[n], REAL_IDS[(n + 1) % len(REAL_IDS)]) for n in range(len(REAL_IDS))]
    queries += [("t0", "test/0.png", "test/1.png"), ("t1", "test/2.png", "test/0.png")]
    return write_resized(tmp_path / "resized", train + test, queries)


def config(**changes) -> shard.ShardConfig:
    return parse(shard.ShardConfig, "shard", {"maxcount": 3, "maxsize": 10**9, **changes})


def test_round_trip_gallery_and_queries(resized, tmp_path):
    out = tmp_path / "shards"
    shard.run_shard(resized, out, config())
    images, queries = manifest.read(resized)
    index = store.read_index(out)
    assert sorted(index["splits"]) == ["test", "train"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # webdataset warns about implicit arguments: pass them all
        # ... but its StreamingOpen leaves each shard's file for the garbage collector to close
        warnings.simplefilter("ignore", ResourceWarning)
        for split in ("train", "test"):
            rows = [r for r in images.to_pylist() if r["split"] == split]
            gallery = list(store.iter_gallery(out, split))
            assert [(i, c) for i, c, _ in gallery] == [(r["image_id"], r["caption"]) for r in rows]
            assert [data for _, _, data in gallery] == [(resized / r["path"]).read_bytes() for r in rows]
            assert index["splits"][split]["gallery"]["count"] == len(rows)

            path_of = {r["image_id"]: r["path"] for r in images.to_pylist()}
            query_rows = [q for q in queries.to_pylist() if q["split"] == split]
            read_back = list(store.iter_queries(out, split))
            assert [{k: q[k] for k in ("query_id", "reference_id", "target_id", "text")} for q in read_back] == [
                {k: q[k] for k in ("query_id", "reference_id", "target_id", "text")} for q in query_rows
            ]
            for got, row in zip(read_back, query_rows):
                assert got["ref"] == (resized / path_of[row["reference_id"]]).read_bytes()
                assert got["tgt"] == (resized / path_of[row["target_id"]]).read_bytes()
            assert index["splits"][split]["queries"]["count"] == len(query_rows)


def test_keys_read_back_by_webdataset_equal_key_of_the_id(resized, tmp_path):
    out = tmp_path / "shards"
    shard.run_shard(resized, out, config())
    urls = store.shard_paths(out, "train", "gallery")
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False))
    assert len(samples) == len(REAL_IDS)
    for sample in samples:
        image_id = json.loads(sample["json"])["image_id"]
        assert sample["__key__"] == store.key(image_id)
        assert {k for k in sample if not k.startswith("__")} in ({"json", "png"}, {"json", "jpg"})
    queries = list(wds.WebDataset(store.shard_paths(out, "train", "queries"), shardshuffle=False,
                                  nodesplitter=None, empty_check=False))
    for sample in queries:
        assert sample["__key__"] == store.key(json.loads(sample["json"])["query_id"])
        assert {k.split(".")[0] for k in sample if not k.startswith("__")} == {"ref", "tgt", "json"}


def test_maxcount_splits_into_the_expected_shards(resized, tmp_path):
    out = tmp_path / "shards"
    shard.run_shard(resized, out, config(maxcount=3))
    train = store.read_index(out)["splits"]["train"]
    assert [s["count"] for s in train["gallery"]["shards"]] == [3, 3, 1]
    assert [s["file"] for s in train["gallery"]["shards"]] == [
        "train/gallery-000000.tar", "train/gallery-000001.tar", "train/gallery-000002.tar"
    ]
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        [f"gallery-{n:06d}.tar" for n in range(3)] + [f"queries-{n:06d}.tar" for n in range(3)]
    )
    assert [Path(p).name for p in store.shard_paths(out, "test", "queries")] == ["queries-000000.tar"]
    assert all(Path(p).is_absolute() for p in store.shard_paths(out, "train", "gallery"))


def test_maxsize_closes_a_shard_once_its_payload_reaches_the_limit(resized, tmp_path):
    out = tmp_path / "shards"
    shard.run_shard(resized, out, config(maxcount=1000, maxsize=1))
    gallery = store.read_index(out)["splits"]["train"]["gallery"]
    assert [s["count"] for s in gallery["shards"]] == [1] * len(REAL_IDS)


def test_index_checksums_match_and_verify_detects_a_flipped_byte(resized, tmp_path):
    out = tmp_path / "shards"
    shard.run_shard(resized, out, config())
    index = store.read_index(out)
    for kinds in index["splits"].values():
        for kind in store.KINDS:
            for entry in kinds[kind]["shards"]:
                assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    store.verify(out)
    victim = out / "train/queries-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(StageError, match="train/queries-000001.tar: sha256 differs"):
        store.verify(out)
    victim.unlink()
    with pytest.raises(StageError, match="train/queries-000001.tar: shard listed in index.json is missing"):
        store.verify(out)


def test_same_input_gives_byte_identical_shards(resized, tmp_path):
    shard.run_shard(resized, tmp_path / "a", config())
    shard.run_shard(resized, tmp_path / "b", config())
    assert (tmp_path / "a/index.json").read_text() == (tmp_path / "b/index.json").read_text()


def test_key_survives_dots_and_slashes_and_never_collides():
    keys = store.unique_keys(REAL_IDS)
    assert len(set(keys)) == len(REAL_IDS)
    for id, k in zip(REAL_IDS, keys):
        assert "." not in k and "/" not in k
    assert store.key("B00006M009") == "B00006M009"  # safe ids stay as they are
    assert store.key("plain-id_7") == "plain-id_7"
    assert store.key("B00006M009.jpg").startswith("B00006M009_jpg-")
    assert store.key("B00006M009.jpg") != store.key("B00006M009_jpg")
    long_id = "x/" * 200
    assert len(store.key(long_id) + ".ref.png") <= 100
    assert store.key(long_id) != store.key(long_id + "y")


def test_unique_keys_raises_when_two_ids_still_share_a_key():
    crafted = store.key("a.b")  # a safe id that equals the key of another one
    with pytest.raises(StageError, match=r"ids 'a\.b' and '.*' have the same shard key"):
        store.unique_keys(["a.b", crafted])
    with pytest.raises(StageError, match="empty id"):
        store.key("")


def test_a_split_without_queries_has_no_query_shards(tmp_path):
    root = write_resized(tmp_path / "resized", [("a", "train", "png"), ("b", "gallery_only", "png")],
                         [("q", "a", "a")])
    out = tmp_path / "shards"
    shard.run_shard(root, out, config())
    assert store.read_index(out)["splits"]["gallery_only"]["queries"] == {"count": 0, "shards": []}
    assert list(store.iter_queries(out, "gallery_only")) == []
    assert [i for i, _, _ in store.iter_gallery(out, "gallery_only")] == ["b"]
    assert not list((out / "gallery_only").glob("queries-*"))


def test_a_crash_midway_leaves_no_output(resized, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    real_write = store.write_shards
    calls = []

    def crash_after_the_first_shards(*args, **kwargs):
        if calls:
            raise RuntimeError("disk full")
        calls.append(args)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(store, "write_shards", crash_after_the_first_shards)
    with pytest.raises(RuntimeError, match="disk full"):
        shard.run_shard(resized, out, config())
    assert calls  # the first shards were written before the crash
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [resized]


def test_a_crash_keeps_the_previous_complete_output(resized, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    shard.run_shard(resized, out, config())
    before = (out / "index.json").read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(store, "write_shards", crash)
    with pytest.raises(RuntimeError):
        shard.run_shard(resized, out, config(maxcount=1))
    assert (out / "index.json").read_text() == before
    store.verify(out)


def test_read_errors_name_the_file_or_split(resized, tmp_path):
    out = tmp_path / "shards"
    with pytest.raises(StageError, match=f"{out / 'index.json'}: missing"):
        store.read_index(out)
    out.mkdir()
    (out / "index.json").write_text("{not json")
    with pytest.raises(StageError, match="index.json: not valid JSON"):
        store.read_index(out)
    (out / "index.json").write_text('{"format": 99, "splits": {}}')
    with pytest.raises(StageError, match="not a shard index of format 1"):
        store.read_index(out)
    shard.run_shard(resized, out, config())
    with pytest.raises(StageError, match="no split 'novel'"):
        store.shard_paths(out, "novel", "gallery")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"maxcount": 0}, r"shard\.maxcount: Input should be greater than 0"),
        ({"maxsize": "1e8"}, r"shard\.maxsize: Input should be a valid integer"),
        ({"compress": True}, r"shard\.compress: unknown key"),
    ],
)
def test_bad_params_name_the_key(change, message):
    with pytest.raises(ParamsError, match=message):
        config(**change)


def test_repository_params_parse():
    with open("params.yaml") as f:
        parse(shard.ShardConfig, "shard", yaml.safe_load(f)["shard"])


def test_cli_prints_the_summary_and_exits_2_on_bad_input(resized, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "shard": {"maxcount": 3, "maxsize": 10**9},
        "parallel": {"runner": "processes", "workers": 1, "address": None, "items_per_task": 64}}))
    shard.main(["--resized", str(resized), "--out", str(tmp_path / "shards")])
    assert "shard: samples/shards test gallery 3/1 queries 2/1; train gallery 7/3 queries 7/3" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        shard.main(["--resized", str(tmp_path / "nothing"), "--out", str(tmp_path / "other")])
    assert exit_info.value.code == 2
    assert "images.parquet: missing" in capsys.readouterr().err
