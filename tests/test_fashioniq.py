"""FashionIQ adapter on the real annotation excerpts in shared/fixtures/fashioniq/.

A local HTTP server stands in for both GitHub (it serves the fixture files, unchanged, as the
annotation base URL) and Amazon (it serves a generated JPEG for every ASIN of the URL lists, except
one ASIN that answers 404). The adapter reaches it through its `url_rewrite` param, which maps the
URL lists' http://ecx.images-amazon.com/ prefix to the server: the fixture URL list is read as is.
Expected counts are computed here from the fixture files with plain json reads.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from shared_fixtures import FIXTURES, fixture
from PIL import Image

from stages.datasets import manifest
from stages.common.errors import StageError
from stages.datasets import fashioniq
from stages.datasets.fashioniq import Config, parse_url_list, query_text
from stages.datasets.download import DownloadConfig

# The two hosts of the URL lists (g-ecx: brand-logo placeholders) and where the fake web serves them.
HOSTS = {"http://ecx.images-amazon.com/": "/ecx/", "http://g-ecx.images-amazon.com/": "/g-ecx/"}
CATEGORIES = ["dress", "shirt", "toptee"]
DEAD_ASIN = "B003FGW7MK"  # candidate of cap.dress.train.json record 0; its URL answers 404
DOWNLOAD = DownloadConfig(workers=8, retries=0, backoff_seconds=0.0, timeout_seconds=10.0)


def fixture_dir() -> Path:
    return fixture("fashioniq")


def load(relative: str):
    return json.loads((fixture_dir() / relative).read_text())


def url_lines(category: str) -> dict[str, str]:
    """ASIN -> URL, read independently of the adapter."""
    text = (fixture_dir() / f"image_url/asin2url.{category}.txt").read_text()
    return dict(line.split() for line in text.splitlines() if line.strip())


def local_path(url: str) -> str:
    """The fake web's path for a URL of the lists."""
    host = next(h for h in HOSTS if url.startswith(h))
    return HOSTS[host] + url.removeprefix(host)


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, seed * 7 % 256, seed * 13 % 256)).save(buffer, format="JPEG")
    return buffer.getvalue()


class FakeWeb:
    """/fiq/<path>: the fixture files; /ecx/..., /g-ecx/...: a JPEG per URL of the lists (404 for DEAD_ASIN)."""

    def __init__(self):
        self.images: dict[str, bytes] = {}
        for category in CATEGORIES:
            for i, (asin, url) in enumerate(sorted(url_lines(category).items())):
                if asin != DEAD_ASIN:
                    self.images[local_path(url)] = jpeg(i)
        self.requests: list[str] = []
        web = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = urlsplit(self.path).path
                web.requests.append(path)
                body = None
                if path.startswith("/fiq/"):
                    file = fixture_dir() / path.removeprefix("/fiq/")
                    body = file.read_bytes() if file.is_file() else None
                else:
                    body = web.images.get(path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def web():
    server = FakeWeb()
    yield server
    server.close()


def config(web: FakeWeb, raw_dir: Path, **changes) -> Config:
    values = dict(
        raw_dir=str(raw_dir),
        annotation_base_url=f"{web.base}/fiq",
        url_list_base_url=f"{web.base}/fiq",
        categories=CATEGORIES,
        splits=["train", "val", "test"],
        gallery="split_file",
        caption_join=" and ",
        url_rewrite={host: web.base + path for host, path in HOSTS.items()},
        expect_full=False,
    )
    return Config(**{**values, **changes})


@pytest.fixture(scope="module")
def built(web, tmp_path_factory):
    """(raw_dir, out_dir, images rows, queries rows, report) of one build over all categories and splits."""
    raw_dir = tmp_path_factory.mktemp("raw")
    out = tmp_path_factory.mktemp("out")
    images, queries = fashioniq.build(config(web, raw_dir), out, DOWNLOAD)
    report = json.loads((out / "ingest_report.json").read_text())
    return raw_dir, out, images, queries, report


# ---------------------------------------------------------------- parsing details


def test_url_lines_accept_any_blanks_and_name_a_bad_line(tmp_path):
    path = tmp_path / "asin2url.dress.txt"
    path.write_text("  B0001 \t http://x/1.jpg\n\tB0002\thttp://x/2.jpg  \r\n\n B0001 \t http://x/other.jpg\n")
    assert parse_url_list(path) == ({"B0001": "http://x/1.jpg", "B0002": "http://x/2.jpg"}, 3)
    path.write_text("B0001 \t http://x/1.jpg\nB0002\n")
    with pytest.raises(StageError, match=rf"{path}: line 2: expected 'ASIN URL'"):
        parse_url_list(path)


def test_fixture_url_lines_use_space_tab_space_and_all_parse():
    raw = (fixture_dir() / "image_url/asin2url.dress.txt").read_text().splitlines()
    assert raw[0].split(" \t ")[0] == "B000FSDAIG"  # the real separator, kept in the fixture
    urls, lines = parse_url_list(fixture_dir() / "image_url/asin2url.dress.txt")
    assert lines == len(raw) and urls == url_lines("dress")


def test_query_text_strips_blanks_and_final_punctuation():
    assert query_text(("is longer.", " has no sleeves "), " and ") == "is longer and has no sleeves"
    assert query_text(("Is it red?", "   "), " and ") == "Is it red"
    assert query_text(("", " "), " and ") == ""


# ---------------------------------------------------------------- the build on the real excerpts


def expected_queries() -> dict[str, dict]:
    """query_id -> row for every triplet with a target whose images are not the dead one."""
    rows = {}
    for category in CATEGORIES:
        for split in ("train", "val"):
            for i, record in enumerate(load(f"captions/cap.{category}.{split}.json")):
                if DEAD_ASIN in (record["candidate"], record["target"]):
                    continue
                rows[f"{category}-{split}-{i:05d}"] = {
                    "split": split, "reference_id": record["candidate"], "target_id": record["target"]
                }
    return rows


def test_queries_match_the_fixture_records(built):
    _, _, _, queries, _ = built
    rows = {q["query_id"]: q for q in queries.to_pylist()}
    expected = expected_queries()
    assert set(rows) == set(expected)
    for query_id, want in expected.items():
        assert {k: rows[query_id][k] for k in want} == want
    # cap.dress.val.json record 0, by hand from the fixture
    assert rows["dress-val-00000"]["reference_id"] == load("captions/cap.dress.val.json")[0]["candidate"]
    # by hand: a trailing '.' and leading blanks are stripped (cap.dress.train #24, cap.dress.val #6,
    # cap.shirt.val #22)
    assert rows["dress-train-00024"]["text"] == "strapless and more red and puffier"
    assert rows["dress-val-00006"]["text"] == "is gold and strapless and button front longer sleeves"
    assert rows["shirt-val-00022"]["text"] == "less graphics and is more revealing and has shorter sleeves"
    record = load("captions/cap.shirt.train.json")[3]
    assert rows["shirt-train-00003"]["text"] == " and ".join(c.strip().rstrip(".?") for c in record["captions"])


def test_dead_url_drops_its_queries_and_is_reported(built):
    raw_dir, out, images, queries, report = built
    assert DEAD_ASIN not in images.column("image_id").to_pylist()
    assert "dress-train-00000" not in queries.column("query_id").to_pylist()
    train = report["splits"]["train"]
    assert DEAD_ASIN in train["missing_images"]["first"] and train["missing_images"]["count"] == 1
    assert train["queries_read"] == 75 and train["dropped"] == {"missing_image": 1}
    assert train["queries_kept"] == 74
    assert report["downloads"]["ok"] == report["images"]["present"] == report["images"]["needed"] - 1
    problems = report["downloads"]["problems"]
    assert [(p["asin"], p["status"]) for p in problems] == [(DEAD_ASIN, "missing")]
    dead_url = problems[0]["url"]
    assert dead_url.endswith(local_path(url_lines("dress")[DEAD_ASIN]))
    assert json.loads((raw_dir / "images/dead_urls.json").read_text()).keys() == {dead_url}
    log = json.loads((raw_dir / "images/download_report.json").read_text())
    assert [(p["url"], p["error"]) for p in log["problems"]] == [(dead_url, "HTTP 404 Not Found")]


def test_test_split_has_images_but_no_queries(built):
    _, _, images, _, report = built
    test = report["splits"]["test"]
    triplets = sum(len(load(f"captions/cap.{c}.test.json")) for c in CATEGORIES)
    assert test["queries_read"] == triplets == 75 and test["dropped"] == {"no_target": triplets}
    assert test["queries_kept"] == 0
    listed = {a for c in CATEGORIES for a in load(f"image_splits/split.{c}.test.json")}
    assert {r["image_id"] for r in images.to_pylist() if r["split"] == "test"} == listed


def test_images_are_the_split_files_linked_not_copied(built):
    raw_dir, out, images, queries, report = built
    rows = images.to_pylist()
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids))
    for category in CATEGORIES:
        for split in ("train", "val", "test"):
            listed = set(load(f"image_splits/split.{category}.{split}.json")) - {DEAD_ASIN}
            mine = {r["image_id"] for r in rows if r["caption"] == category}
            assert listed <= mine
            assert all(r["split"] == split for r in rows if r["image_id"] in listed)
    row = rows[0]
    assert row["path"] == f"images/{row['image_id']}.jpg" and ".." not in row["path"]
    assert os.path.samefile(out / row["path"], raw_dir / "images" / f"{row['image_id']}.jpg")
    assert report["images_copied_not_linked"] == 0
    manifest.validate(images, queries)


def test_report_has_sha256_of_every_annotation_file(built):
    _, _, _, _, report = built
    assert len(report["annotation_sha256"]) == 9 * 2 + 3
    for relative, digest in report["annotation_sha256"].items():
        assert hashlib.sha256((fixture_dir() / relative).read_bytes()).hexdigest() == digest
    assert report["images"]["sharing_a_url"] == 2  # two shirt ASINs share one URL in the excerpt


def test_second_build_fetches_nothing(web, built, tmp_path):
    raw_dir, _, images, queries, _ = built
    before = len(web.requests)
    again_images, again_queries = fashioniq.build(config(web, raw_dir), tmp_path / "again", DOWNLOAD)
    assert len(web.requests) == before  # annotations and images cached, the dead URL remembered
    assert again_images.equals(images) and again_queries.equals(queries)
    first_report = (built[1] / "ingest_report.json").read_bytes()
    assert (tmp_path / "again/ingest_report.json").read_bytes() == first_report


def test_gallery_of_query_images_only(web, built, tmp_path):
    raw_dir, _, _, queries, _ = built
    images, again = fashioniq.build(config(web, raw_dir, gallery="query_images"), tmp_path / "q", DOWNLOAD)
    used = {
        record[role]
        for c in CATEGORIES for s in ("train", "val") for record in load(f"captions/cap.{c}.{s}.json")
        for role in ("candidate", "target")
    }
    assert set(images.column("image_id").to_pylist()) == used - {DEAD_ASIN}
    assert again.equals(queries)


# ---------------------------------------------------------------- awkward and broken inputs


def copy_annotations(raw_dir: Path, categories=CATEGORIES, splits=("train", "val", "test")) -> None:
    """Put the fixture annotation files into a temporary raw_dir (annotation_base_url None)."""
    relatives = [f"captions/cap.{c}.{s}.json" for c in categories for s in splits]
    relatives += [f"image_splits/split.{c}.{s}.json" for c in categories for s in splits]
    relatives += [f"image_url/asin2url.{c}.txt" for c in categories]
    for relative in relatives:
        (raw_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (raw_dir / relative).write_bytes((fixture_dir() / relative).read_bytes())


def test_malformed_record_names_file_and_record(web, tmp_path):
    copy_annotations(tmp_path)
    path = tmp_path / "captions/cap.shirt.val.json"
    records = json.loads(path.read_text())
    records[3]["candidate"] = None
    path.write_text(json.dumps(records))
    cfg = config(web, tmp_path, annotation_base_url=None, url_list_base_url=None)
    with pytest.raises(StageError, match=rf"{path}: record 3: 'candidate' must be a non-empty string"):
        fashioniq.build(cfg, tmp_path / "out", DOWNLOAD)
    path.write_text("[{")
    with pytest.raises(StageError, match=rf"{path}: not valid JSON"):
        fashioniq.build(cfg, tmp_path / "out", DOWNLOAD)


def test_missing_annotation_file_says_where_to_get_it(web, tmp_path):
    cfg = config(web, tmp_path, annotation_base_url=None, url_list_base_url=None, categories=["dress"])
    with pytest.raises(StageError, match=r"(?s)missing:.*cap\.dress\.train\.json.*XiaoxiaoGuo/fashion-iq"):
        fashioniq.build(cfg, tmp_path / "out", DOWNLOAD)


def test_expect_full_names_file_and_counts(web, tmp_path):
    copy_annotations(tmp_path, ["dress"])
    cfg = config(web, tmp_path, annotation_base_url=None, url_list_base_url=None, categories=["dress"],
                 expect_full=True)
    with pytest.raises(StageError, match=r"cap\.dress\.train\.json: expected 5,985 triplets .*found 25"):
        fashioniq.build(cfg, tmp_path / "out", DOWNLOAD)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4))


def test_image_in_two_splits_goes_to_val_and_duplicates_are_handled(web, tmp_path):
    """Made-up annotations (the excerpts have no such case): A1 is train for dress and val for shirt;
    A2 is the candidate of two dress triplets; one triplet names one image twice, one has blank captions."""
    raw = tmp_path / "raw"
    write_json(raw / "captions/cap.dress.train.json", [
        {"target": "A1", "candidate": "A2", "captions": ["is red", "is long"]},
        {"target": "A3", "candidate": "A2", "captions": ["", "is blue."]},
        {"target": "A3", "candidate": "A3", "captions": ["same", "same"]},
        {"target": "A4", "candidate": "A3", "captions": [" ", ""]},
    ])
    write_json(raw / "image_splits/split.dress.train.json", ["A1", "A2", "A3", "A4"])
    write_json(raw / "captions/cap.shirt.val.json", [{"target": "A1", "candidate": "B1", "captions": ["x", "y"]}])
    write_json(raw / "image_splits/split.shirt.val.json", ["A1", "B1"])
    (raw / "image_url").mkdir()
    for category, asins in (("dress", ["A1", "A2", "A3", "A4"]), ("shirt", ["A1", "B1"])):
        # unreachable URLs: the files are already in raw_dir/images, so nothing is requested
        (raw / f"image_url/asin2url.{category}.txt").write_text(
            "".join(f"{a} \t http://127.0.0.1:9/{a}.jpg\n" for a in asins))
    for i, asin in enumerate(["A1", "A2", "A3", "A4", "B1"]):
        (raw / "images").mkdir(parents=True, exist_ok=True)
        (raw / f"images/{asin}.jpg").write_bytes(jpeg(i))
    for category, split in (("dress", "val"), ("shirt", "train")):
        write_json(raw / f"captions/cap.{category}.{split}.json", [])
        write_json(raw / f"image_splits/split.{category}.{split}.json", [])
    cfg = config(web, raw, annotation_base_url=None, url_list_base_url=None, categories=["dress", "shirt"],
                 splits=["train", "val"], url_rewrite={})
    images, queries = fashioniq.build(cfg, tmp_path / "out", DOWNLOAD)
    split_of = dict(zip(images.column("image_id").to_pylist(), images.column("split").to_pylist()))
    assert split_of == {"A1": "val", "A2": "train", "A3": "train", "A4": "train", "B1": "val"}
    rows = {q["query_id"]: q for q in queries.to_pylist()}
    assert set(rows) == {"dress-train-00001", "shirt-val-00000"}
    assert rows["dress-train-00001"]["text"] == "is blue"
    report = json.loads((tmp_path / "out/ingest_report.json").read_text())
    assert report["splits"]["train"]["dropped"] == {
        "image_in_other_split": 1, "reference_equals_target": 1, "empty_text": 1}
    manifest.validate(images, queries)


def test_copy_when_hard_links_fail(web, built, tmp_path, monkeypatch, capsys):
    raw_dir = built[0]

    def no_links(source, dest):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    images, _ = fashioniq.build(config(web, raw_dir, categories=["dress"], splits=["val"]), tmp_path / "o", DOWNLOAD)
    assert capsys.readouterr().err.count("cannot hard-link") == 1
    first = images.to_pylist()[0]
    copy, source = tmp_path / "o" / first["path"], raw_dir / "images" / f"{first['image_id']}.jpg"
    assert copy.read_bytes() == source.read_bytes() and not os.path.samefile(copy, source)
    report = json.loads((tmp_path / "o/ingest_report.json").read_text())
    assert report["images_copied_not_linked"] == images.num_rows
