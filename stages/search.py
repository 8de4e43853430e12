"""Search one split with a trained model and its feature index (the `index` stage's data/index: the gallery is
never re-embedded; an index of another model file is refused). A command to look at a model, not a DVC stage.

Image-text matching (dual_encoder): a text ranks the split's gallery images, an image its captions, by cosine.

    python -m stages.search --model data/train/model.pt --shards data/shards --split test \
        --text "a small red circle" --k 8 --out search/
    python -m stages.search ... --image path/to/query.png --k 8 --out search/     (image -> captions)
    python -m stages.search ... --image-id <a gallery image id> --k 8 --out search/

Composed retrieval (tirg, composeae, val, amc, ...): a reference image and a modification text rank the gallery
images; the reference itself is left out of the ranking when it is a gallery image (as the evaluation protocols
do), and the target is marked when the query is one of the split's queries.

    python -m stages.search ... --query-id <a query of the split> --out search/       (its reference and text)
    python -m stages.search ... --reference-id <a gallery image id> --text "make the circle green" --out search/
    python -m stages.search ... --image path/to/reference.png --text "make the circle green" --out search/

Failures (either task), from `evaluate --per-query` (data/evaluate): the worst-ranked queries of the split first,
under one protocol (composed; default the first evaluated) or direction (matching; default t2i).

    python -m stages.search --model data/train/model.pt --shards data/shards --failures data/evaluate \
        --split test --limit 20 --out failures/

The output folder appears only once complete (it replaces an earlier one):

    <out>/index.html       the query, then the top-k results (rank, ids, score, caption, image; the target marked)
    <out>/grid.png         the result images in a row-major grid, rank and score under each
    <out>/results.json     the query and the ranked list
    <out>/rank01.png ...   the result images (for image queries: the image of each ranked caption)
    <out>/query.png        image queries and composed queries: the query (reference) image as given
--failures writes index.html (one row per query: its rank, query, target and top-k) and results.json, with the
images it shows as img0001.png ...

An image file is resized and centre-cropped to the gallery's image size (read from one gallery image) before the
image tower sees it, as the `resize` stage did to the gallery.
"""
from __future__ import annotations

import argparse
import html
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from stages.common.atomic import staged_dir
from stages.common.device import pick_device
from stages.common.errors import StageError, run_stage
from stages.retrieval import feature_index, per_query
from stages.retrieval.embedding import load_for_embedding
from stages.retrieval.query import image_query_tensor, rank_split
from stages.shards import store
from stages.shards.loaders import decode_image

RESULTS_FILE, INDEX_FILE, GRID_FILE = "results.json", "index.html", "grid.png"
DEFAULT_INDEX = Path("data/index")
# grid.png: `columns` tiles a row, each result image fitted into tile x tile, a label band under it, PAD around.
PAD, LABEL_HEIGHT = 6, 16
FORMAT_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}


@dataclass
class Result:
    rank: int
    score: float
    image_id: str
    caption: str
    caption_id: str | None = None  # image queries: the ranked caption's id
    target: bool | None = None      # composed queries of the split: whether this is the query's target
    file: str = ""                  # the result image's file name in the output folder


@dataclass
class Query:
    """What the command was asked: `described` is recorded in results.json."""
    described: dict
    ranked: str                     # "images" or "captions"
    image: bytes | None = None      # the query image (image -> captions) or the reference image (composed)
    image_file: bool = False        # image is a file given by --image (fitted to the gallery size), not from the shards
    text: str | None = None
    exclude_id: str | None = None   # composed: the reference, when it is a gallery image of the split
    target_id: str | None = None    # composed: the target of a query of the split


# --- model and shards ----------------------------------------------------------------------------


def gallery_count(shard_dir: Path, split: str) -> int:
    """Images in a split's gallery; an unknown split or one without gallery shards is an error."""
    if not store.shard_paths(shard_dir, split, "gallery"):  # raises for an unknown split
        raise StageError(f"{shard_dir}: split {split!r} has no gallery shards")
    return int(store.read_index(shard_dir)["splits"][split]["gallery"]["count"])


def gallery_image_size(shard_dir: Path, split: str) -> tuple[int, int]:
    """(width, height) of the split's first gallery image: the size every gallery image was resized to."""
    for _, _, data in store.iter_gallery(shard_dir, split):
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    raise StageError(f"{shard_dir}: split {split!r} has no gallery images")


def gallery_images(shard_dir: Path, split: str, image_ids: set[str]) -> dict[str, bytes]:
    """{image id: image file bytes} of the named gallery images of a split."""
    found = {}
    for image_id, _, data in store.iter_gallery(shard_dir, split):
        if image_id in image_ids:
            found[image_id] = data
            if len(found) == len(image_ids):
                break
    return found


def find_query(shard_dir: Path, split: str, query_id: str) -> dict:
    """The query of the split with this id (query_id, reference_id, target_id, text, ref and tgt bytes)."""
    for query in store.iter_queries(shard_dir, split):
        if query["query_id"] == query_id:
            return query
    raise StageError(f"--query-id {query_id!r}: not a query of split {split!r} ({shard_dir})")


def check_k(k: int, available: int, what: str, split: str) -> None:
    if not 0 < k <= available:
        raise StageError(f"--k {k}: split {split!r} has {available} {what}; k must be in 1..{available}")


# --- queries -------------------------------------------------------------------------------------


def read_image_file(path: Path) -> bytes:
    if not path.is_file():
        raise StageError(f"--image {path}: no such file")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except UnidentifiedImageError:
        raise StageError(f"--image {path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError) as err:
        raise StageError(f"--image {path}: a damaged image ({err})") from None
    return data


def matching_query(args, index: feature_index.SplitIndex) -> Query:
    for flag, value in (("--query-id", args.query_id), ("--reference-id", args.reference_id)):
        if value is not None:
            raise StageError(f"{flag} asks for a composed-retrieval model; {args.model} is an image-text matching "
                             f"model: use --text, --image or --image-id")
    given = [flag for flag, value in (("--text", args.text), ("--image", args.image), ("--image-id", args.image_id))
             if value is not None]
    if len(given) != 1:
        raise StageError(f"an image-text matching model takes one of --text, --image, --image-id (got "
                         f"{', '.join(given) or 'none'})")
    if args.text is not None:
        check_k(args.k, len(index.image_ids), "gallery images", args.split)
        return Query({"text": args.text}, "images", text=args.text)
    check_k(args.k, len(index.caption_ids), "captions", args.split)
    if args.image is not None:
        return Query({"image": str(args.image)}, "captions", image=read_image_file(args.image), image_file=True)
    image = gallery_images(args.shards, args.split, {args.image_id}).get(args.image_id)
    if image is None:
        raise StageError(f"--image-id {args.image_id!r}: not a gallery image of split {args.split!r} "
                         f"({len(index.image_ids)} images in {args.shards})")
    return Query({"image_id": args.image_id}, "captions", image=image)


def composed_query(args, index: feature_index.SplitIndex) -> Query:
    if args.image_id is not None:
        raise StageError(f"--image-id ranks captions with an image-text matching model; {args.model} is a composed-"
                         f"retrieval model: use --reference-id ID --text TEXT")
    check_k(args.k, len(index.image_ids), "gallery images", args.split)
    if args.query_id is not None:
        if args.text is not None or args.image is not None or args.reference_id is not None:
            raise StageError("--query-id brings its own reference and text: give no --text, --image or --reference-id")
        query = find_query(args.shards, args.split, args.query_id)
        described = {key: query[key] for key in ("query_id", "reference_id", "target_id", "text")}
        return Query(described, "images", image=query["ref"], text=query["text"],
                     exclude_id=query["reference_id"] if query["reference_id"] in index.rows else None,
                     target_id=query["target_id"])
    references = [flag for flag, value in (("--reference-id", args.reference_id), ("--image", args.image))
                  if value is not None]
    if len(references) != 1 or args.text is None:
        raise StageError("a composed-retrieval model takes --query-id ID, or a reference (--reference-id ID or "
                         "--image FILE) with --text TEXT")
    if args.image is not None:
        return Query({"image": str(args.image), "text": args.text}, "images", image=read_image_file(args.image),
                     image_file=True, text=args.text)
    image = gallery_images(args.shards, args.split, {args.reference_id}).get(args.reference_id)
    if image is None:
        raise StageError(f"--reference-id {args.reference_id!r}: not a gallery image of split {args.split!r} "
                         f"({len(index.image_ids)} images in {args.shards})")
    return Query({"reference_id": args.reference_id, "text": args.text}, "images", image=image, text=args.text,
                 exclude_id=args.reference_id)


def search(model, tokenizer, task: str, query: Query, index: feature_index.SplitIndex, k: int,
           image_size: tuple[int, int] | None, device: torch.device) -> list[Result]:
    """The k best results of a query against one split of the index."""
    image = None
    if query.image is not None:
        image = image_query_tensor(query.image, image_size) if query.image_file else decode_image(query.image)
    ranked, rows = rank_split(model, tokenizer, task, index, k, device, query.text, image, query.exclude_id)
    if ranked == "captions":
        return [Result(rank, score, index.caption_images[row], index.caption_texts[row], index.caption_ids[row])
                for rank, (row, score) in enumerate(rows, start=1)]
    return [Result(rank, score, index.image_ids[row], index.captions[row],
                   target=None if query.target_id is None else index.image_ids[row] == query.target_id)
            for rank, (row, score) in enumerate(rows, start=1)]


# --- output --------------------------------------------------------------------------------------


def image_extension(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return FORMAT_EXTENSIONS.get(img.format or "", ".png")


def grid_size(k: int, tile: int, columns: int) -> tuple[int, int]:
    """(width, height) of grid.png for k results."""
    cols = min(k, columns)
    rows = math.ceil(k / cols)
    return cols * tile + (cols + 1) * PAD, rows * (tile + LABEL_HEIGHT) + (rows + 1) * PAD


def write_grid(path: Path, results: list[Result], images: dict[str, bytes], tile: int, columns: int) -> None:
    """The result images row-major, each fitted into tile x tile, "#rank  score" under each ("T" after a
    composed query's target, which also gets a red frame)."""
    grid = Image.new("RGB", grid_size(len(results), tile, columns), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    cols = min(len(results), columns)
    for i, result in enumerate(results):
        x = PAD + (i % cols) * (tile + PAD)
        y = PAD + (i // cols) * (tile + LABEL_HEIGHT + PAD)
        with Image.open(io.BytesIO(images[result.image_id])) as img:
            thumb = ImageOps.contain(img.convert("RGB"), (tile, tile))
        grid.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        if result.target:
            draw.rectangle((x - 2, y - 2, x + tile + 1, y + tile + 1), outline="red", width=2)
        label = f"#{result.rank}  {result.score:.4f}" + ("  T" if result.target else "")
        draw.text((x + max(0.0, (tile - draw.textlength(label, font=font)) / 2), y + tile + 2), label,
                  fill="black", font=font)
    grid.save(path)


_STYLE = """body { font-family: sans-serif; margin: 1.5em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 1em; }
figure { margin: 0; } figure img, td img, .query img { width: 160px; image-rendering: pixelated; }
td.top img { width: 64px; } figure.target img, img.target { outline: 4px solid #d22; }
.badge { background: #d22; color: white; padding: 0 0.4em; border-radius: 0.3em; }
.meta { color: #666; } td { padding: 0.3em 0.6em; vertical-align: middle; } .score { font-family: monospace; }"""


def _page(title: str, head: str, meta: str, body: list[str], files: list[str]) -> str:
    esc = html.escape
    links = " · ".join(f'<a href="{name}">{name}</a>' for name in files)
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>search: {esc(title)}</title>",
        f"<style>\n{_STYLE}\n</style></head><body>", head, f'<p class="meta">{esc(meta)}</p>', *body,
        f"<p>{links}</p>", "</body></html>", ""])


def render_html(query: Query, results: list[Result], meta: str, query_file: str | None) -> str:
    esc = html.escape
    described = query.described
    if query.ranked == "images":
        if query.image is None:
            title = query.text
            head = f'<h1>Text query</h1>\n<p class="query">{esc(query.text)}</p>'
        else:
            title = described.get("query_id") or query.text
            known = (f'query {esc(described["query_id"])}: reference {esc(described["reference_id"])}, target '
                     f'{esc(described["target_id"])}<br>' if "query_id" in described else "")
            head = (f'<h1>Composed query</h1>\n<p class="query"><img src="{esc(query_file or "")}" alt="reference">'
                    f'<br>{known}+ {esc(query.text)}</p>')
        body = ['<div class="grid">']
        for r in results:
            badge = ' <span class="badge">target</span>' if r.target else ""
            marked = ' class="target"' if r.target else ""
            body.append(f'<figure{marked}><img src="{esc(r.file)}" alt="rank {r.rank}"><figcaption>'
                        f'<b>#{r.rank}</b> {esc(r.image_id)}{badge}<br><span class="score">{r.score:.4f}</span><br>'
                        f'{esc(r.caption)}</figcaption></figure>')
        body.append("</div>")
    else:
        title = described.get("image_id") or described["image"]
        head = (f'<h1>Image query</h1>\n<p class="query"><img src="{esc(query_file or "")}" alt="query"><br>'
                f'{esc(title)}</p>')
        body = ["<table>", "<tr><th>rank</th><th>image</th><th>score</th><th>caption</th><th>caption id</th>"
                           "<th>image id</th></tr>"]
        for r in results:
            body.append(f'<tr><td>{r.rank}</td><td><img src="{esc(r.file)}" alt="{esc(r.image_id)}"></td>'
                        f'<td class="score">{r.score:.4f}</td><td>{esc(r.caption)}</td>'
                        f'<td>{esc(r.caption_id or "")}</td><td>{esc(r.image_id)}</td></tr>')
        body.append("</table>")
    return _page(title, head, meta, body, [GRID_FILE, RESULTS_FILE])


def print_table(results: list[Result]) -> None:
    captions = any(r.caption_id is not None for r in results)
    targets = any(r.target is not None for r in results)
    header = ["rank", "score", *(["caption_id"] if captions else []), "image_id", *(["target"] if targets else []),
              "caption"]
    rows = [[str(r.rank), f"{r.score:.4f}", *([r.caption_id or ""] if captions else []), r.image_id,
             *(["target" if r.target else ""] if targets else []),
             r.caption if len(r.caption) <= 70 else r.caption[:67] + "..."] for r in results]
    _print_rows(header, rows, right=2)


def _print_rows(header: list[str], rows: list[list[str]], right: int) -> None:
    """Columns padded to their widest cell (the first `right` right-aligned), the last one left as it is."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(w) if i < right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              + "  " + row[-1])


def write_output(out: Path, query: Query, results: list[Result], images: dict[str, bytes], meta: dict, tile: int,
                 columns: int) -> None:
    width = max(2, len(str(len(results))))
    with staged_dir(out) as work:
        query_file = None
        if query.image is not None:
            query_file = "query" + image_extension(query.image)
            (work / query_file).write_bytes(query.image)
        for r in results:
            data = images[r.image_id]
            r.file = f"rank{r.rank:0{width}d}{image_extension(data)}"
            (work / r.file).write_bytes(data)
        write_grid(work / GRID_FILE, results, images, tile, columns)
        summary = (f"top {len(results)} of {meta['gallery_size']} {query.ranked} of split {meta['split']!r} "
                   f"({meta['shards']}) by {meta['model']}"
                   + (f", reference {query.exclude_id} left out" if query.exclude_id is not None else ""))
        (work / INDEX_FILE).write_text(render_html(query, results, summary, query_file), encoding="utf-8")
        listed = [asdict(r) for r in results]
        for entry in listed:
            for key in ("caption_id", "target"):  # text and composed queries rank images; only composed mark
                if entry[key] is None:
                    del entry[key]
        record = {"query": {**query.described, **({"file": query_file} if query_file else {})},
                  "ranked": query.ranked, **meta, "k": len(results), "results": listed}
        (work / RESULTS_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- failures ------------------------------------------------------------------------------------


def failures(folder: Path, split: str, task: str, which: str | None, limit: int) -> tuple[str, list[dict]]:
    """(the protocol or direction shown, the `limit` worst-ranked per-query rows of the split, worst first)."""
    key = "protocol" if task == "composed" else "direction"
    rows = per_query.read_split(folder, split)
    if rows and key not in rows[0]:
        raise StageError(f"{folder}/{split}.parquet holds per-query rows of the other task than {task!r}: "
                         f"re-run `dvc repro evaluate` for this model")
    chosen = per_query.worst_first(rows, key, which if which is not None else ("t2i" if task == "matching" else None))
    return (chosen[0][key] if chosen else which or ""), chosen[:limit]


def print_failures(rows: list[dict], task: str) -> None:
    header = ["#", "rank", "query_id", *(["reference_id", "target_id"] if task == "composed" else ["image_id"]),
              "text"]
    cells = []
    for n, row in enumerate(rows, start=1):
        text = row["text"] or ""
        cells.append([str(n), "-" if row["target_rank"] is None else str(row["target_rank"]), row["query_id"],
                      *([row["reference_id"], row["target_id"]] if task == "composed" else [row["image_id"]]),
                      text if len(text) <= 70 else text[:67] + "..."])
    _print_rows(header, cells, right=2)


def write_failures(out: Path, rows: list[dict], task: str, which: str, images: dict[str, bytes], meta: dict) -> None:
    """index.html (one row per query, worst first) and results.json; the images shown as img0001.png ..."""
    esc = html.escape
    with staged_dir(out) as work:
        files = {}
        for n, image_id in enumerate(sorted(images), start=1):
            files[image_id] = f"img{n:04d}{image_extension(images[image_id])}"
            (work / files[image_id]).write_bytes(images[image_id])

        def img(image_id: str, marked: bool = False) -> str:
            if image_id not in files:
                return esc(image_id)
            marking = ' class="target"' if marked else ""
            return f'<img src="{files[image_id]}" alt="{esc(image_id)}" title="{esc(image_id)}"{marking}>'

        target_key = "target_id" if task == "composed" else "image_id"
        body = ["<table>", "<tr><th>#</th><th>rank</th><th>query</th><th>target</th><th>top results</th></tr>"]
        for n, row in enumerate(rows, start=1):
            if task == "composed":
                query = f'{img(row["reference_id"])}<br>{esc(row["query_id"])}: + {esc(row["text"])}'
            elif row["direction"] == "t2i":
                query = f'{esc(row["query_id"])}: {esc(row["text"])}'
            else:
                query = img(row["image_id"])
            if row.get("direction") == "i2t":  # an image ranked captions: their ids
                tops = esc(", ".join(row["top_ids"]))
            else:
                tops = " ".join(img(i, i == row[target_key]) for i in row["top_ids"])
            rank = "none" if row["target_rank"] is None else f'{row["target_rank"]} of {row["candidates"]}'
            body.append(f'<tr><td>{n}</td><td>{rank}</td><td>{query}</td><td>{img(row[target_key])}</td>'
                        f'<td class="top">{tops}</td></tr>')
        body.append("</table>")
        summary = (f"the {len(rows)} worst-ranked queries of split {meta['split']!r} under {which} "
                   f"({meta['per_query']}), by {meta['model']}")
        (work / INDEX_FILE).write_text(_page(f"failures {meta['split']}", "<h1>Failures</h1>", summary, body,
                                             [RESULTS_FILE]), encoding="utf-8")
        record = {**meta, "which": which, "failures": rows}
        (work / RESULTS_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def failure_images(rows: list[dict], task: str) -> set[str]:
    """The gallery images a failures page shows: references and targets (composed) or the queried images
    (matching), and the ranked images (not the captions that i2t rows rank)."""
    ids = set()
    for row in rows:
        if task == "composed":
            ids.update([row["reference_id"], row["target_id"], *row["top_ids"]])
        else:
            ids.add(row["image_id"])
            if row["direction"] == "t2i":
                ids.update(row["top_ids"])
    return ids


# --- command -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (from the repository root, after `dvc repro`):\n"
               "  python -m stages.search --model data/train/model.pt --shards data/shards --split test "
               "--failures data/evaluate --out search/failures")
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint the index was built from")
    parser.add_argument("--shards", type=store.location, required=True, help=store.LOCATION_HELP)
    parser.add_argument("--index", type=Path, default=DEFAULT_INDEX,
                        help=f"the `index` stage's folder of the model's features (default: {DEFAULT_INDEX})")
    parser.add_argument("--split", default="test", help="the split whose gallery is searched (default: test)")
    parser.add_argument("--text", help="matching: rank the gallery images by this caption; composed: the "
                                       "modification of --reference-id or --image")
    parser.add_argument("--image", type=Path, help="matching: rank the captions by this image file; composed: the "
                                                   "reference image file (with --text)")
    parser.add_argument("--image-id", help="matching: rank the captions by this gallery image of the split")
    parser.add_argument("--query-id", help="composed: this query of the split (its reference and text; the target "
                                           "is marked)")
    parser.add_argument("--reference-id", help="composed: this gallery image of the split as the reference (with "
                                               "--text)")
    parser.add_argument("--failures", type=Path, help="the folder of `evaluate --per-query` (data/evaluate): list "
                                                      "the split's worst-ranked queries first")
    parser.add_argument("--protocol", help="--failures: the protocol (composed; default: the first evaluated) or "
                                           "direction (matching: t2i or i2t; default t2i) whose ranks are shown")
    parser.add_argument("--limit", type=int, default=20, help="--failures: queries listed (default: 20)")
    parser.add_argument("--k", type=int, default=8, help="results to show (default: 8)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory: index.html, grid.png, results.json, the result images")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (default: auto, CUDA when present)")
    parser.add_argument("--tile", type=int, default=128, help="grid.png: each result fitted into tile x tile pixels")
    parser.add_argument("--columns", type=int, default=4, help="grid.png: results per row")
    args = parser.parse_args(argv)
    for name in ("k", "limit", "tile", "columns"):
        if getattr(args, name) < 1:
            raise StageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.text is not None and not args.text.strip():
        raise StageError("--text is empty")
    return args


def run_failures(args, manifest: dict) -> None:
    asked = [flag for flag, value in (("--text", args.text), ("--image", args.image), ("--image-id", args.image_id),
                                      ("--query-id", args.query_id), ("--reference-id", args.reference_id))
             if value is not None]
    if asked:
        raise StageError(f"--failures lists the evaluated queries; it takes no {asked[0]}")
    which, rows = failures(args.failures, args.split, manifest["task"], args.protocol, args.limit)
    images = gallery_images(args.shards, args.split, failure_images(rows, manifest["task"]))
    meta = {"model": str(args.model), "shards": str(args.shards), "split": args.split,
            "per_query": str(args.failures)}
    write_failures(args.out, rows, manifest["task"], which, images, meta)
    print_failures(rows, manifest["task"])
    print(f"search: the {len(rows)} worst-ranked queries of {args.split!r} under {which} -> {args.out / INDEX_FILE}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # the split, the index and the query are checked before the model is loaded: a typo fails fast
    gallery_count(args.shards, args.split)
    manifest = feature_index.open_index(args.index, args.model)
    if args.failures is not None:
        run_failures(args, manifest)
        return
    if args.protocol is not None:
        raise StageError("--protocol chooses the ranks --failures lists; give --failures too")
    index = feature_index.load_split(args.index, manifest, args.split)
    task = manifest["task"]
    query = composed_query(args, index) if task == "composed" else matching_query(args, index)

    device = pick_device(args.device)
    model, tokenizer = load_for_embedding(args.model, device)
    image_size = gallery_image_size(args.shards, args.split) if query.image_file else None
    results = search(model, tokenizer, task, query, index, args.k, image_size, device)
    size = len(index.caption_ids) if query.ranked == "captions" else len(index.image_ids)
    meta = {"model": str(args.model), "shards": str(args.shards), "index": str(args.index), "split": args.split,
            "gallery_size": size}
    images = gallery_images(args.shards, args.split, {r.image_id for r in results})
    write_output(args.out, query, results, images, meta, args.tile, args.columns)
    print_table(results)
    print(f"search: {len(results)} results -> {args.out / INDEX_FILE}")


if __name__ == "__main__":
    run_stage(main)
