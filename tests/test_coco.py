"""COCO-Karpathy adapter: a hand-written dataset_coco.json + tiny JPEGs -> images/, the manifests,
captions.parquet, folds.json, ingest_report.json; the image zips through a real local HTTP server."""
from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import threading
import zipfile
from functools import partial
from pathlib import Path

import pyarrow as pa
import pytest
from karpathy_files import DOWNLOAD, five, record, write_jpeg, write_karpathy

from stages.datasets import captions, manifest
from stages.common.errors import StageError
from stages.datasets import coco
from stages.common.params import ParamsError, parse

FIRST_RAWS = [  # the first Karpathy test image, as DATASETS.md §7 quotes it (4 of them made up)
    "A man with a red helmet on a small moped on a dirt road. ",
    "Man riding a motor bike on a dirt road on the countryside.",
    "A man riding on the back of a motorcycle.",
    "  A dirt path with a young person on a motor bike.  ",
    "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
]


def val(n: int) -> str:
    return f"COCO_val2014_{n:012d}.jpg"


def train(n: int) -> str:
    return f"COCO_train2014_{n:012d}.jpg"


def coco_records() -> list[dict]:
    """10 images in Karpathy order: 5 test, 2 val (one file missing), 2 train (one with 6 sentences,
    one with a blank one), 1 restval."""
    rows = [("val2014", val(391895), "test", FIRST_RAWS)]
    rows += [("val2014", val(n), "test", five(f"test image {n}")) for n in (522418, 184613, 318219, 554625)]
    rows += [("val2014", val(397133), "val", five("val image")), ("val2014", val(37777), "val", five("lost image"))]
    rows += [("train2014", train(57870), "train", five("train image") + ["A sixth sentence."])]
    rows += [("train2014", train(384029), "train", five("other train image")[:4] + ["   ", "Five of them."])]
    rows += [("val2014", val(252219), "restval", five("restval image"))]
    records, sentid = [], 770337
    for imgid, (folder, filename, split, raws) in enumerate(rows):
        cocoid = int(filename[-16:-4])
        records.append(record(imgid, filename, split, raws, sentid, filepath=folder, cocoid=cocoid))
        sentid += len(raws)
    return records


MISSING = val(37777)


def coco_sources(root: Path, records: list[dict]) -> None:
    """The JPEGs of every record except MISSING, under root/<filepath>/<filename>."""
    for r in records:
        if r["filename"] != MISSING:
            write_jpeg(root / r["filepath"] / r["filename"], r["filename"])


def config(raw: Path, **changes) -> coco.Config:
    return coco.Config(**{"raw_dir": str(raw), "images_dir": str(raw / "images"), "folds": 2,
                          "on_missing": "drop", **changes})


@pytest.fixture
def raw(tmp_path) -> Path:
    raw = tmp_path / "raw"
    records = coco_records()
    write_karpathy(raw / "dataset_coco.json", records, "coco")
    coco_sources(raw / "images", records)
    return raw


def build(raw: Path, out: Path, **changes) -> tuple[pa.Table, pa.Table]:
    images, queries = coco.build(config(raw, **changes), out, DOWNLOAD)
    manifest.write(out, images, queries)  # what the prepare stage does with them
    return images, queries


def sha256_hex(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the manifests


def test_manifests_counts_and_fields(raw, tmp_path):
    out = tmp_path / "out"
    images, queries = build(raw, out)
    assert queries.num_rows == 0 and queries.schema.equals(manifest.QUERIES_SCHEMA)
    rows = {r["image_id"]: r for r in images.to_pylist()}
    # 10 images in the JSON, one file missing; restval joins train.
    assert len(rows) == 9
    assert [r["split"] for r in images.to_pylist()] == ["test"] * 5 + ["val"] + ["train"] * 3
    first = rows["COCO_val2014_000000391895"]
    assert first == {
        "image_id": "COCO_val2014_000000391895",
        "path": "images/val2014/COCO_val2014_000000391895.jpg",
        "split": "test",
        "caption": "A man with a red helmet on a small moped on a dirt road.",  # trailing space gone
    }
    assert rows["COCO_train2014_000000057870"]["path"] == "images/train2014/COCO_train2014_000000057870.jpg"
    assert "COCO_val2014_000000037777" not in rows
    for r in rows.values():
        source = raw / "images" / r["path"].removeprefix("images/")
        assert os.path.samefile(out / r["path"], source)  # hard link, not a copy


def test_captions_parquet_keeps_five_per_image(raw, tmp_path):
    out = tmp_path / "out"
    build(raw, out)
    table = captions.read(out)
    assert table.num_rows == 9 * 5
    grouped = captions.by_image(table)
    assert grouped["COCO_val2014_000000391895"] == [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
        "A dirt path with a young person on a motor bike.",  # leading and trailing spaces gone
        "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
    ]
    assert table.column("caption_id").to_pylist()[:2] == ["770337", "770338"]  # the sentids
    assert "A sixth sentence." not in grouped["COCO_train2014_000000057870"]
    # The blank sentence is skipped, the image still has five.
    assert grouped["COCO_train2014_000000384029"][-1] == "Five of them."
    restval = [r["split"] for r in table.to_pylist() if r["image_id"] == "COCO_val2014_000000252219"]
    assert restval == ["train"] * 5


def test_restval_can_stay_its_own_split(raw, tmp_path):
    images, _ = build(raw, tmp_path / "out", restval_as_train=False)
    split_of = dict(zip(images["image_id"].to_pylist(), images["split"].to_pylist()))
    assert split_of["COCO_val2014_000000252219"] == "restval"
    assert captions.read(tmp_path / "out").to_pylist()[-1]["split"] == "restval"


def test_folds_cut_the_test_split_in_karpathy_order(raw, tmp_path):
    out = tmp_path / "out"
    build(raw, out)
    folds = json.loads((out / "folds.json").read_text())
    assert folds == {
        "0": ["COCO_val2014_000000391895", "COCO_val2014_000000522418"],
        "1": ["COCO_val2014_000000184613", "COCO_val2014_000000318219"],
    }
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["folds"] == {"count": 2, "images": {"0": 2, "1": 2}, "left_over": ["COCO_val2014_000000554625"]}


def test_ingest_report(raw, tmp_path):
    out = tmp_path / "out"
    build(raw, out)
    report = json.loads((out / "ingest_report.json").read_text())
    annotation = raw / "dataset_coco.json"
    assert report["raw_dir"] == str(raw)
    assert report["annotation_sha256"] == {"dataset_coco.json": sha256_hex(annotation)}
    assert report["annotation_matches_mirror"] is False
    assert report["karpathy_splits"] == {"train": 2, "restval": 1, "val": 2, "test": 5}
    assert report["images"] == {"test": 5, "train": 3, "val": 1}
    assert report["captions"] == {"test": 25, "train": 15, "val": 5}
    assert report["missing_images"] == [
        {"image_id": "COCO_val2014_000000037777", "file": "val2014/COCO_val2014_000000037777.jpg", "split": "val"}
    ]
    assert report["blank_sentences_skipped"] == 1 and report["sentences_beyond_captions_per_image"] == 1
    assert report["images_copied_not_linked"] == 0 and report["image_archives"] == {}


def test_across_filesystems_images_are_copied_and_said_once(raw, tmp_path, monkeypatch, capsys):
    def no_link(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "out"
    images, _ = build(raw, out)
    assert all((out / p).read_bytes() == (raw / "images" / p.removeprefix("images/")).read_bytes()
               for p in images["path"].to_pylist())
    assert capsys.readouterr().err.count("copying the images instead") == 1
    assert json.loads((out / "ingest_report.json").read_text())["images_copied_not_linked"] == 9


# ---------------------------------------------------------------- errors


def test_missing_image_is_an_error_by_default(raw, tmp_path):
    with pytest.raises(StageError) as err:
        build(raw, tmp_path / "out", on_missing="error")
    message = str(err.value)
    assert "coco: 1 of 10 images are missing" in message and "(val 1)" in message
    assert str(raw / "images" / "val2014" / MISSING) in message and "download_images: true" in message


def test_malformed_json_names_the_file(raw, tmp_path):
    annotation = raw / "dataset_coco.json"
    annotation.write_text('{"images": [')
    with pytest.raises(StageError, match=f"{annotation}: not valid JSON"):
        build(raw, tmp_path / "out")
    annotation.write_text('{"imgs": []}')
    with pytest.raises(StageError, match=f"{annotation}: expected an object with an 'images' list"):
        build(raw, tmp_path / "out")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r.pop("filepath"), r"images\[3\]: field 'filepath' should be a str, got missing"),
        (lambda r: r.update(split="holdout"), r"images\[3\]: field 'split' is 'holdout'"),
        (lambda r: r.update(filename="../../etc/passwd"),
         r"images\[3\]: field 'filename' '../../etc/passwd' is not a plain"),
        (lambda r: r["sentences"][2].update(sentid="7"), r"images\[3\].sentences\[2\]: field 'sentid' should be a int"),
        (lambda r: r["sentences"][0].pop("raw"), r"images\[3\].sentences\[0\]: field 'raw' should be a str"),
    ],
)
def test_malformed_record_names_file_and_record(raw, tmp_path, change, message):
    records = coco_records()
    change(records[3])
    write_karpathy(raw / "dataset_coco.json", records, "coco")
    with pytest.raises(StageError, match=f"{raw / 'dataset_coco.json'}: {message}"):
        build(raw, tmp_path / "out")


def test_too_few_captions_and_duplicates_are_errors(raw, tmp_path):
    too_few = r"images\[0\] \(val2014/COCO_val2014_000000391895.jpg\) has 5 non-blank sentences, fewer than "
    with pytest.raises(StageError, match=too_few + "captions_per_image = 6"):
        build(raw, tmp_path / "out", captions_per_image=6)
    records = coco_records()
    records[2]["sentences"][0]["sentid"] = records[1]["sentences"][0]["sentid"]
    write_karpathy(raw / "dataset_coco.json", records, "coco")
    with pytest.raises(StageError, match="two sentences have the sentid 770342"):
        build(raw, tmp_path / "out")


def test_expect_full_checks_the_published_counts(raw, tmp_path):
    with pytest.raises(StageError, match=r"expected the full coco Karpathy split, 123287 images .* found 10"):
        build(raw, tmp_path / "out", expect_full=True)


def test_missing_annotation_says_where_to_put_it(tmp_path):
    with pytest.raises(StageError, match="dataset_coco.json: missing. Put Karpathy's dataset_coco.json there"):
        coco.build(config(tmp_path / "raw"), tmp_path / "out", DOWNLOAD)


def test_config_defaults_and_checks():
    cfg = parse(coco.Config, "dataset.coco", {})
    assert (cfg.raw_dir, cfg.captions_per_image, cfg.folds, cfg.on_missing) == ("data/raw/coco", 5, 5, "error")
    with pytest.raises(ParamsError, match="dataset.coco.on_missing"):
        parse(coco.Config, "dataset.coco", {"on_missing": "ignore"})
    with pytest.raises(ParamsError, match=r"dataset.coco.image_zip_url: must contain \{name\}"):
        parse(coco.Config, "dataset.coco", {"image_zip_url": "http://x/train2014.zip"})


# ---------------------------------------------------------------- downloads through a local server


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(served folder, base URL, requested paths): a real HTTP server on 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()
    handler = type("Handler", (CountingHandler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}", handler.requests
    httpd.shutdown()
    httpd.server_close()


def zip_folder(folder: Path, archive: Path, arcname_root: Path) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(folder.rglob("*")):
            zf.write(file, file.relative_to(arcname_root).as_posix())


def test_image_zips_and_karpathy_zip_come_from_http(tmp_path, server):
    served, base, requests = server
    records = coco_records()
    staging = tmp_path / "staging"
    coco_sources(staging, records)
    for folder in ("train2014", "val2014"):
        zip_folder(staging / folder, served / f"{folder}.zip", staging)
    with zipfile.ZipFile(served / "caption_datasets.zip", "w") as zf:
        zf.writestr("dataset_coco.json", json.dumps({"images": records, "dataset": "coco"}))
        zf.writestr("dataset_flickr30k.json", "{}")
    raw = tmp_path / "raw"
    changes = dict(
        download_images=True,
        image_zip_url=base + "/{name}.zip",
        karpathy_url=base + "/caption_datasets.zip",
    )

    out = tmp_path / "out"
    images, _ = build(raw, out, **changes)
    assert sorted(requests) == ["/caption_datasets.zip", "/train2014.zip", "/val2014.zip"]
    assert images.num_rows == 9
    assert all((out / p).is_file() for p in images["path"].to_pylist())
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["image_archives"] == {
        name: {"bytes": (served / name).stat().st_size, "sha256": sha256_hex(served / name)}
        for name in ("train2014.zip", "val2014.zip")
    }
    assert (raw / "dataset_coco.json").is_file()  # extracted from the Karpathy zip

    # A second run asks the server nothing and unpacks nothing again.
    extracted = raw / "images" / "val2014" / val(391895)
    before = extracted.stat().st_mtime_ns
    requests.clear()
    images_again, _ = build(raw, tmp_path / "again", **changes)
    assert requests == [] and extracted.stat().st_mtime_ns == before
    assert images_again.equals(images)


def test_dead_image_url_is_an_error_naming_it(raw, tmp_path, server):
    _, base, _ = server
    with pytest.raises(StageError, match=rf"{base}/train2014.zip: missing \(HTTP 404"):
        build(raw, tmp_path / "out", download_images=True, image_zip_url=base + "/{name}.zip")


def test_karpathy_json_from_a_local_zip_or_a_plain_url(raw, tmp_path, server):
    annotation = raw / "dataset_coco.json"
    with zipfile.ZipFile(raw / "caption_datasets.zip", "w") as zf:
        zf.write(annotation, "caption_datasets/dataset_coco.json")
    text = annotation.read_text()
    annotation.unlink()
    images, _ = build(raw, tmp_path / "from_zip")
    assert images.num_rows == 9 and annotation.read_text() == text  # unpacked next to the zip

    served, base, _ = server
    (served / "mirror.json").write_text(text)
    build(raw, tmp_path / "from_url", karpathy_url=base + "/mirror.json")
    report = json.loads((tmp_path / "from_url" / "ingest_report.json").read_text())
    assert list(report["annotation_sha256"]) == ["mirror.json"]
