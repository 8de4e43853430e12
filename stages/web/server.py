"""The FastAPI application behind `python -m stages.app`: a trained model, its feature index (the `index` stage) and
the shards, read once into memory, answering the page's queries.

    GET  /                     the page (static/index.html); /static/app.js, /static/style.css
    GET  /api/info             the task, the model, the splits and what the page may ask
    GET  /api/gallery          a page of a split's gallery images (ids, captions)
    GET  /api/queries          a page of a split's known queries (composed), in shard order or, with per-query results,
                               worst target rank first (order=failures)
    GET  /api/image            one gallery image's bytes, looked up by split and id in memory
    GET  /api/search           composed: query_id [text], or reference_id + text; matching: text, or image_id
    POST /api/search/upload    the body is an image file: composed (with text: the reference) or matching (-> captions)

Nothing a request says reaches the filesystem: files are read when the application is made, images are served from
a dictionary keyed by gallery id (an unknown id or a path is a 404). Uploads are checked by stages.web.uploads.
Errors are JSON {"detail": message}, never a traceback.
"""
from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from stages.common.errors import StageError
from stages.retrieval import feature_index, per_query
from stages.retrieval.embedding import load_for_embedding
from stages.retrieval.query import fit_image, rank_split
from stages.shards import store
from stages.shards.loaders import decode_image
from stages.web import uploads

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
MAX_K, MAX_PAGE = 100, 200
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class BadRequest(Exception):
    """A query the model cannot answer as asked (400), or asks for something that is not there (404)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def media_type(data: bytes) -> str:
    """The shards hold PNG and JPEG files (stages.shards.store)."""
    return "image/png" if data.startswith(b"\x89PNG\r\n\x1a\n") else "image/jpeg"


@dataclass
class Split:
    """One split, in memory: its index, its gallery image bytes and its known queries."""
    index: feature_index.SplitIndex
    images: dict[str, bytes]
    image_size: tuple[int, int]
    queries: list[dict] = field(default_factory=list)  # query_id, reference_id, target_id, text, target_rank
    query_of: dict[str, dict] = field(default_factory=dict)
    references: dict[str, bytes] = field(default_factory=dict)  # queries' reference bytes not in the gallery
    which: str | None = None  # the protocol of target_rank (with per-query results)
    no_ranks: str | None = None  # why the split has no target ranks, when the app was given per-query results


def read_split(index_dir: Path, manifest: dict, shard_dir: Path | str, name: str,
               per_query_dir: Path | None) -> Split:
    index = feature_index.load_split(index_dir, manifest, name)
    images = {image_id: data for image_id, _, data in store.iter_gallery(shard_dir, name)}
    if list(images) != index.image_ids:
        raise StageError(f"{index_dir}: the index of split {name!r} does not list the gallery of {shard_dir} "
                         f"(other shards?): re-run `dvc repro index`")
    split = Split(index, images, image_size(images[index.image_ids[0]]))
    if manifest["task"] != "composed":
        return split
    for query in store.iter_queries(shard_dir, name):
        record = {key: query[key] for key in ("query_id", "reference_id", "target_id", "text")}
        record["target_rank"] = None
        if query["reference_id"] not in images:
            split.references[query["query_id"]] = query["ref"]
        split.queries.append(record)
        split.query_of[record["query_id"]] = record
    if per_query_dir is not None:
        try:
            rows = per_query.read_split(per_query_dir, name)
        except StageError as err:  # evaluate scored other splits than the index holds: said when failures are asked
            split.no_ranks = str(err)
            return split
        if rows and "protocol" not in rows[0]:
            raise StageError(f"{per_query_dir}: per-query results of an image-text matching model; the model is a "
                             f"composed-retrieval one: re-run `dvc repro evaluate`")
        split.which = rows[0]["protocol"] if rows else None
        for row in rows:
            if row["protocol"] == split.which and row["query_id"] in split.query_of:
                split.query_of[row["query_id"]]["target_rank"] = row["target_rank"]
    return split


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image file's bytes."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


class Engine:
    """The model, its index, the shards and (optionally) evaluate's per-query results, read once."""

    def __init__(self, model_path: Path, index_dir: Path, shard_dir: Path | str, per_query_dir: Path | None,
                 device: torch.device):
        self.manifest = feature_index.open_index(index_dir, model_path)
        self.task = self.manifest["task"]
        self.model, self.tokenizer = load_for_embedding(model_path, device)
        self.device, self.model_name = device, self.manifest["model_name"]
        self.model_path, self.per_query = str(model_path), per_query_dir is not None
        self.splits = {name: read_split(index_dir, self.manifest, shard_dir, name, per_query_dir)
                       for name in self.manifest["splits"]}
        self.lock = threading.Lock()  # one query through the model at a time

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise BadRequest(f"no split {name!r} (the index has {', '.join(self.splits)})", 404)
        return self.splits[name]

    def info(self) -> dict:
        return {"task": self.task, "model": self.model_path, "model_name": self.model_name,
                "splits": [{"name": name, "gallery": len(split.index.image_ids), "queries": len(split.queries),
                            "captions": len(split.index.caption_ids or []), "protocol": split.which}
                           for name, split in self.splits.items()],
                "per_query": self.per_query, "max_k": MAX_K}

    def gallery(self, name: str, offset: int, limit: int) -> dict:
        split = self.split(name)
        rows = range(offset, min(offset + limit, len(split.index.image_ids)))
        return {"total": len(split.index.image_ids), "offset": offset,
                "items": [{"image_id": split.index.image_ids[i], "caption": split.index.captions[i]} for i in rows]}

    def queries(self, name: str, offset: int, limit: int, order: str) -> dict:
        split = self.split(name)
        if self.task != "composed":
            raise BadRequest("an image-text matching model has no composed queries: search by text or image")
        listed = split.queries
        if order == "failures":
            if not self.per_query:
                raise BadRequest("the failures order needs evaluate's per-query results: start the app with "
                                 "--per-query data/evaluate")
            if split.no_ranks is not None:
                raise BadRequest(split.no_ranks)
            listed = sorted(listed, key=lambda q: -(q["target_rank"] if q["target_rank"] is not None else 2**31))
        return {"total": len(listed), "offset": offset, "order": order, "protocol": split.which,
                "items": listed[offset:offset + limit]}

    def image(self, name: str, image_id: str) -> bytes:
        data = self.split(name).images.get(image_id)
        if data is None:
            raise BadRequest(f"no gallery image {image_id!r} in split {name!r}", 404)
        return data

    def search(self, name: str, k: int, query_id: str | None = None, reference_id: str | None = None,
               image_id: str | None = None, text: str | None = None, upload=None) -> dict:
        """The top k for one query; `upload` is a decoded PIL image (already checked)."""
        split = self.split(name)
        if text is not None and not text.strip():
            raise BadRequest("the text is empty")
        given = [key for key, value in (("query_id", query_id), ("reference_id", reference_id),
                                        ("image_id", image_id), ("upload", upload)) if value is not None]
        query, exclude, target = ({"split": name}, None, None)
        if self.task == "composed":
            if len(given) != 1 or given[0] == "image_id":
                raise BadRequest("a composed query is one of: query_id (its own text, or a new one), reference_id "
                                 "with text, or an uploaded reference image with text")
            if query_id is not None:
                known = split.query_of.get(query_id)
                if known is None:
                    raise BadRequest(f"no query {query_id!r} in split {name!r}", 404)
                data = split.references.get(query_id) or split.images[known["reference_id"]]
                image = decode_image(data)
                if text is None or text == known["text"]:
                    text, target = known["text"], known["target_id"]
                query.update(query_id=query_id, reference_id=known["reference_id"], text=text)
                exclude = known["reference_id"] if known["reference_id"] in split.index.rows else None
            elif text is None:
                raise BadRequest("a composed query needs a text: the modification of the reference")
            elif reference_id is not None:
                image, exclude = decode_image(self.image(name, reference_id)), reference_id
                query.update(reference_id=reference_id, text=text)
            else:
                image = fit_image(upload, split.image_size)
                query.update(upload=True, text=text)
        else:
            if query_id is not None or reference_id is not None:
                raise BadRequest("an image-text matching model takes a text, a gallery image_id or an uploaded image")
            if len([v for v in (text, image_id, upload) if v is not None]) != 1:
                raise BadRequest("an image-text matching query is one of: a text (-> images), a gallery image_id or "
                                 "an uploaded image (-> captions)")
            image = None
            if image_id is not None:
                image = decode_image(self.image(name, image_id))
                query.update(image_id=image_id)
            elif upload is not None:
                image = fit_image(upload, split.image_size)
                query.update(upload=True)
            else:
                query.update(text=text)
        with self.lock:
            ranked, rows = rank_split(self.model, self.tokenizer, self.task, split.index, k, self.device, text,
                                      image, exclude)
        index = split.index
        if ranked == "captions":
            results = [{"rank": rank, "score": score, "caption_id": index.caption_ids[row],
                        "image_id": index.caption_images[row], "text": index.caption_texts[row]}
                       for rank, (row, score) in enumerate(rows, start=1)]
        else:
            results = [{"rank": rank, "score": score, "image_id": index.image_ids[row], "caption": index.captions[row],
                        "target": index.image_ids[row] == target}
                       for rank, (row, score) in enumerate(rows, start=1)]
        return {"ranked": ranked, "query": query, "target_id": target, "excluded": exclude, "results": results}


def create_app(engine: Engine, max_bytes: int = uploads.MAX_BYTES, max_pixels: int = uploads.MAX_PIXELS) -> FastAPI:
    """The application; the page's files are read here, once."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    static = {name: (STATIC / name).read_bytes() for name in STATIC_TYPES}
    app = FastAPI(title="cirflow", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(uploads.Rejected)
    async def rejected(request: Request, err: uploads.Rejected):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(StageError)
    async def stage_error(request: Request, err: StageError):
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": "internal error (the server's log has the details)"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/static/{name}")
    def static_file(name: str) -> Response:
        if name not in static:
            raise BadRequest(f"no file {name!r}", 404)
        return Response(static[name], media_type=STATIC_TYPES[name])

    @app.get("/api/info")
    def info() -> dict:
        return engine.info()

    @app.get("/api/gallery")
    def gallery(split: str, offset: int = Query(0, ge=0), limit: int = Query(24, ge=1, le=MAX_PAGE)) -> dict:
        return engine.gallery(split, offset, limit)

    @app.get("/api/queries")
    def queries(split: str, offset: int = Query(0, ge=0), limit: int = Query(20, ge=1, le=MAX_PAGE),
                order: str = Query("file", pattern="^(file|failures)$")) -> dict:
        return engine.queries(split, offset, limit, order)

    @app.get("/api/image")
    def image(split: str, id: str) -> Response:
        data = engine.image(split, id)
        return Response(data, media_type=media_type(data), headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/search")
    def search(split: str, k: int = Query(10, ge=1, le=MAX_K), query_id: str | None = None,
               reference_id: str | None = None, image_id: str | None = None, text: str | None = None) -> dict:
        return engine.search(split, k, query_id=query_id, reference_id=reference_id, image_id=image_id, text=text)

    @app.post("/api/search/upload")
    async def search_upload(request: Request, split: str, k: int = Query(10, ge=1, le=MAX_K),
                            text: str | None = None) -> dict:
        engine.split(split)  # an unknown split fails before the body is read
        data = await uploads.read_capped(request.headers.get("content-length"), request.stream(), max_bytes)
        image = await run_in_threadpool(uploads.decode, data, max_pixels)
        return await run_in_threadpool(engine.search, split, k, text=text, upload=image)

    return app
