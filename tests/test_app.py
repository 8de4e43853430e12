"""stages.app through FastAPI's TestClient: its safety rules one by one (loopback bind, upload byte and pixel caps,
image types from the bytes, gallery images by id only, errors as JSON), and its answers against rankings recomputed
here, for a composed model (tiny TIRG) and an image-text matching one (tiny dual encoder)."""
import io
import math
import struct
import zlib

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from stages import app as app_command
from stages.retrieval import per_query
from stages.retrieval.embedding import embed_captions, embed_gallery, embed_queries, load_for_embedding
from stages.shards import store
from stages.web import uploads
from stages.web.server import Engine, create_app
from test_matching_pipeline import MATCHING
from tiny_inprocess import build

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def engine(tiny_composed):
    return Engine(tiny_composed.model, tiny_composed.index, tiny_composed.shards, tiny_composed.per_query, CPU)


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(create_app(engine))


@pytest.fixture(scope="module")
def small(engine):
    """The same engine with a 2,000-byte and 1,000-pixel cap on uploads."""
    return TestClient(create_app(engine, max_bytes=2000, max_pixels=1000))


@pytest.fixture(scope="module")
def embedded(tiny_composed):
    model, tokenizer = load_for_embedding(tiny_composed.model, CPU)
    image_ids, _, gallery = embed_gallery(model, tiny_composed.shards, "test", 64, CPU)
    records, queries = embed_queries(model, tokenizer, tiny_composed.shards, "test", 64, CPU)
    images = {i: d for i, _, d in store.iter_gallery(tiny_composed.shards, "test")}
    return {"image_ids": image_ids, "gallery": gallery, "records": records, "queries": queries["composed"],
            "images": images}


def expected_top(query, gallery, image_ids, k, exclude=None):
    scores = gallery @ query
    if exclude is not None:
        scores[image_ids.index(exclude)] = -math.inf
    return [image_ids[i] for i in sorted(range(len(image_ids)), key=lambda i: (-float(scores[i]), i))[:k]]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny (wrong) IDAT: only a decoder would notice."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(size=(20, 20), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


UPLOAD = "/api/search/upload?split=test&k=5&text=make%20it%20red"


# --- safety ---------------------------------------------------------------------------------------


def test_the_server_binds_the_loopback_address_unless_told(tiny_composed, monkeypatch):
    import uvicorn

    assert app_command.parse_args(["--model", "m.pt", "--shards", "s"]).host == "127.0.0.1"
    bound = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: bound.append((host, port)))
    paths = ["--model", str(tiny_composed.model), "--index", str(tiny_composed.index), "--shards",
             str(tiny_composed.shards), "--device", "cpu"]
    app_command.main(paths)
    app_command.main([*paths, "--host", "0.0.0.0", "--port", "8123"])
    assert bound == [("127.0.0.1", 8000), ("0.0.0.0", 8123)]


def test_an_upload_over_the_byte_cap_is_413_by_its_length_and_while_streaming(small):
    response = small.post(UPLOAD, content=b"\0" * 2001)
    assert response.status_code == 413
    assert response.json() == {"detail": "the upload is 2001 bytes; the limit is 2000 bytes"}

    def chunks():  # no Content-Length: sent chunked, counted as it arrives
        for _ in range(10):
            yield b"\0" * 500
    response = small.post(UPLOAD, content=chunks())
    assert response.status_code == 413
    assert response.json() == {"detail": "the upload exceeds the limit of 2000 bytes"}


def test_a_decompression_bomb_is_refused_from_its_header(client, engine):
    response = client.post(UPLOAD, content=png_header(30000, 30000))  # beyond Pillow's own hard limit
    assert response.status_code == 413 and "too large to decode safely" in response.json()["detail"]
    response = client.post(UPLOAD, content=png_header(6000, 6000))  # under Pillow's, over ours
    assert response.status_code == 413
    assert response.json() == {"detail": "the image is 6000 x 6000 = 36000000 pixels; the limit is 25000000 pixels"}
    # Pillow's warning (over 89 M pixels) is an error even when our own cap would allow the image
    lenient = TestClient(create_app(engine, max_pixels=10**9))
    response = lenient.post(UPLOAD, content=png_header(10000, 10000))
    assert response.status_code == 413 and "too large to decode safely" in response.json()["detail"]


def test_the_pixel_cap_applies_to_real_images(small):
    response = small.post(UPLOAD, content=encoded((40, 40)))
    assert response.status_code == 413 and "40 x 40 = 1600 pixels; the limit is 1000" in response.json()["detail"]


def test_only_images_pillow_recognises_from_the_bytes_are_decoded(client):
    for body, content_type in [(b"#!/bin/sh\necho hello\n", "image/png"), (b"<svg xmlns='x'/>", "image/svg+xml"),
                               (encoded(fmt="TIFF"), "image/tiff"), (b"%PDF-1.4\n", "image/jpeg")]:
        response = client.post(UPLOAD, content=body, headers={"content-type": content_type})
        assert response.status_code == 415, body[:10]
        assert response.json() == {"detail": "not an image of a supported type (PNG, JPEG, WEBP, GIF, BMP)"}
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):  # the declared type does not matter either way
        response = client.post(UPLOAD, content=encoded(fmt=fmt), headers={"content-type": "text/plain"})
        assert response.status_code == 200, (fmt, response.text)


def test_a_damaged_image_gets_a_message_not_a_traceback(client):
    data = encoded((40, 40))
    response = client.post(UPLOAD, content=data[:len(data) // 2])
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith("a damaged PNG image") and "Traceback" not in response.text
    assert client.post(UPLOAD, content=b"").json() == {
        "detail": "the upload is empty: send the image file as the request body"}


def test_only_gallery_images_are_served_by_id(client, embedded):
    image_id = embedded["image_ids"][0]
    response = client.get("/api/image", params={"split": "test", "id": image_id})
    assert response.status_code == 200 and response.content == embedded["images"][image_id]
    assert response.headers["content-type"] == "image/png"
    for split, image_id in [("test", "../../etc/passwd"), ("test", "../index.json"), ("test", "no-such-image"),
                            ("../test", image_id), ("nope", image_id)]:
        response = client.get("/api/image", params={"split": split, "id": image_id})
        assert response.status_code == 404, (split, image_id)
        assert "detail" in response.json()
    for path in ("/static/../server.py", "/static/%2e%2e%2fserver.py", "/static/index.html", "/static/uploads.py",
                 "/api/image/../../etc/passwd", "/etc/passwd"):
        assert client.get(path).status_code == 404, path


def test_every_response_carries_the_safety_headers(client):
    for path in ("/", "/static/app.js", "/api/info", "/api/image?split=test&id=nope"):
        headers = client.get(path).headers
        assert headers["x-content-type-options"] == "nosniff"
        assert "default-src 'self'" in headers["content-security-policy"]


def test_an_internal_error_is_json_without_a_traceback(engine, monkeypatch):
    quiet = TestClient(create_app(engine), raise_server_exceptions=False)

    def broken(*args):
        raise RuntimeError("secret detail /home/user/path")
    monkeypatch.setattr(engine, "gallery", broken)
    response = quiet.get("/api/gallery", params={"split": "test"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error (the server's log has the details)"}


# --- composed answers -----------------------------------------------------------------------------


def test_the_page_and_its_files(client, embedded):
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js"></script>' in page.text
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    info = client.get("/api/info").json()
    assert info["task"] == "composed" and info["model_name"] == "tirg" and info["per_query"]
    assert info["splits"] == [{"name": "test", "gallery": len(embedded["image_ids"]),
                               "queries": len(embedded["records"]), "captions": 0, "protocol": "target"}]


def test_a_known_query_answers_as_recomputed_here_with_its_target_marked(client, embedded):
    j = 4
    record = embedded["records"][j]
    data = client.get("/api/search", params={"split": "test", "k": 12, "query_id": record["query_id"]}).json()
    expected = expected_top(embedded["queries"][j], embedded["gallery"], embedded["image_ids"], 12,
                            record["reference_id"])
    assert [r["image_id"] for r in data["results"]] == expected
    assert [r["target"] for r in data["results"]] == [i == record["target_id"] for i in expected]
    assert data["target_id"] == record["target_id"] and data["excluded"] == record["reference_id"]
    # a new text for the same reference: no target to mark any more
    edited = client.get("/api/search", params={"split": "test", "k": 12, "query_id": record["query_id"],
                                               "text": "add a large red circle at top-left"}).json()
    assert edited["target_id"] is None and not any(r["target"] for r in edited["results"])
    by_reference = client.get("/api/search", params={"split": "test", "k": 12, "reference_id": record["reference_id"],
                                                     "text": record["text"]}).json()
    assert [r["image_id"] for r in by_reference["results"]] == expected


def test_an_uploaded_reference_ranks_like_the_gallery_image_without_exclusion(client, embedded):
    j = 7
    record = embedded["records"][j]
    data = client.post(f"/api/search/upload?split=test&k=8&text={record['text']}",
                       content=embedded["images"][record["reference_id"]]).json()
    assert [r["image_id"] for r in data["results"]] == expected_top(embedded["queries"][j], embedded["gallery"],
                                                                    embedded["image_ids"], 8)
    assert data["query"] == {"split": "test", "upload": True, "text": record["text"]}
    response = client.post("/api/search/upload?split=test&k=8", content=embedded["images"][record["reference_id"]])
    assert response.status_code == 400 and "needs a text" in response.json()["detail"]


def test_queries_list_in_shard_order_or_worst_first_and_the_gallery_pages(client, tiny_composed, embedded):
    listed = client.get("/api/queries", params={"split": "test", "limit": 200}).json()
    assert [q["query_id"] for q in listed["items"]] == [r["query_id"] for r in embedded["records"]]
    rows = per_query.read_split(tiny_composed.per_query, "test")
    worst = client.get("/api/queries", params={"split": "test", "order": "failures", "limit": 5}).json()
    assert [q["target_rank"] for q in worst["items"]] == sorted((r["target_rank"] for r in rows), reverse=True)[:5]
    assert worst["protocol"] == "target" and worst["total"] == len(rows)
    page = client.get("/api/gallery", params={"split": "test", "offset": 24, "limit": 24}).json()
    assert [item["image_id"] for item in page["items"]] == embedded["image_ids"][24:48]
    assert page["total"] == len(embedded["image_ids"])
    assert client.get("/api/gallery", params={"split": "test", "limit": 100000}).status_code == 422


def test_requests_that_do_not_fit_the_model_are_400_with_a_message(client, embedded):
    record = embedded["records"][0]
    for params, message in [({"image_id": record["reference_id"]}, "a composed query is one of"),
                            ({"reference_id": record["reference_id"]}, "needs a text"),
                            ({"query_id": record["query_id"], "reference_id": record["reference_id"]},
                             "a composed query is one of"),
                            ({"query_id": record["query_id"], "text": "  "}, "the text is empty")]:
        response = client.get("/api/search", params={"split": "test", **params})
        assert response.status_code == 400 and message in response.json()["detail"], params
    assert client.get("/api/search", params={"split": "test", "query_id": "nope"}).status_code == 404
    assert client.get("/api/search", params={"split": "test", "query_id": record["query_id"],
                                             "k": 1000}).status_code == 422


# --- image-text matching answers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def matching(tmp_path_factory):
    # the matching pipeline test's params up to pretrain (mine and train do not run here)
    run = build(tmp_path_factory.mktemp("matching"),
                **{key: value for key, value in MATCHING.items() if key not in ("mine", "train")})
    client = TestClient(create_app(Engine(run.model, run.index, run.shards, None, CPU)))
    model, tokenizer = load_for_embedding(run.model, CPU)
    image_ids, _, images = embed_gallery(model, run.shards, "test", 64, CPU)
    caption_ids, _, texts = embed_captions(model, tokenizer, run.shards, "test", 64, CPU)
    image_bytes = {i: d for i, _, d in store.iter_gallery(run.shards, "test")}
    return client, {"model": model, "tokenizer": tokenizer, "image_ids": image_ids, "images": images,
                    "caption_ids": caption_ids, "texts": texts, "image_bytes": image_bytes}


def test_matching_a_text_ranks_images_and_an_image_ranks_captions(matching):
    client, m = matching
    assert client.get("/api/info").json()["task"] == "matching"
    text = "a small red circle"
    with torch.no_grad():
        tokens, lengths = m["tokenizer"].batch([text])
        query = torch.nn.functional.normalize(m["model"].encode_text(tokens, lengths), dim=1)[0]
    data = client.get("/api/search", params={"split": "test", "k": 6, "text": text}).json()
    assert data["ranked"] == "images"
    assert [r["image_id"] for r in data["results"]] == expected_top(query, m["images"], m["image_ids"], 6)

    image_id = m["image_ids"][2]
    by_id = client.get("/api/search", params={"split": "test", "k": 6, "image_id": image_id}).json()
    assert by_id["ranked"] == "captions"
    assert [r["caption_id"] for r in by_id["results"]] == expected_top(
        m["images"][2], m["texts"], m["caption_ids"], 6)
    uploaded = client.post("/api/search/upload?split=test&k=6", content=m["image_bytes"][image_id]).json()
    assert [r["caption_id"] for r in uploaded["results"]] == [r["caption_id"] for r in by_id["results"]]
    for params in ({"query_id": "q"}, {"reference_id": image_id, "text": "x"}, {"text": "x", "image_id": image_id}):
        assert client.get("/api/search", params={"split": "test", **params}).status_code == 400
    response = client.get("/api/queries", params={"split": "test"})
    assert response.status_code == 400 and "no composed queries" in response.json()["detail"]


def test_the_upload_limits_are_the_documented_defaults():
    assert (uploads.MAX_BYTES, uploads.MAX_PIXELS) == (8 * 1024 * 1024, 25_000_000)
    args = app_command.parse_args(["--model", "m.pt", "--shards", "s"])
    assert (args.max_upload_bytes, args.max_pixels, args.port) == (uploads.MAX_BYTES, uploads.MAX_PIXELS, 8000)


def test_a_split_without_per_query_results_says_so_when_failures_are_asked(tiny_composed, tmp_path):
    (tmp_path / "per_query").mkdir()  # evaluate scored no split the index holds
    client = TestClient(create_app(Engine(tiny_composed.model, tiny_composed.index, tiny_composed.shards,
                                          tmp_path / "per_query", CPU)))
    assert client.get("/api/queries", params={"split": "test"}).status_code == 200
    response = client.get("/api/queries", params={"split": "test", "order": "failures"})
    assert response.status_code == 400 and "test.parquet: no per-query results for split 'test'" in \
        response.json()["detail"]
