"""Search one split with a trained image-text matching model (the Guided Image Retrieval demo): a text ranks
the split's gallery images, an image ranks the split's captions, by cosine. A command to look at a model,
not a DVC stage.

    python -m stages.search --model data/train/model.pt --shards data/shards --split test \
        --text "a small red circle" --k 8 --out search/
    python -m stages.search ... --image path/to/query.png --k 8 --out search/     (image -> captions)
    python -m stages.search ... --image-id <a gallery image id> --k 8 --out search/

The output folder appears only once complete (it replaces an earlier one):

    <out>/index.html       the query, then the top-k results (rank, ids, score, caption, image)
    <out>/grid.png         the result images in a row-major grid, rank and score under each
    <out>/results.json     the query and the ranked list
    <out>/rank01.png ...   the result images (for image queries: the image of each ranked caption)
    <out>/query.png        image queries: the query image as given

An image query is resized and centre-cropped to the gallery's image size (read from one gallery image) before
the image tower sees it, as the `resize` stage did to the gallery.
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
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torch import nn
from torchvision.transforms import v2

from stages.shards import store
from stages.common.atomic import staged_dir
from stages.common.errors import StageError, run_stage
from stages.retrieval.embedding import embed_captions, embed_gallery
from stages.shards.loaders import decode_image
from stages.modeling.factory import load_model
from stages.retrieval.topk import chunked_topk
from stages.modeling.text import tokenizer_from_state
from stages.common.device import autocast, pick_device, place_model, to_device

RESULTS_FILE, INDEX_FILE, GRID_FILE = "results.json", "index.html", "grid.png"
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
    file: str = ""                  # the result image's file name in the output folder


# --- model and shards ----------------------------------------------------------------------------


def load_matching_model(path: Path, device: torch.device):
    """(model in eval mode on `device`, its tokenizer); a composed-retrieval checkpoint is refused."""
    model, cfg, text_state, _ = load_model(path)
    if not (hasattr(model, "encode_text") and not hasattr(model, "compose")):
        raise StageError(f"search needs an image-text matching model (model.name dual_encoder); "
                         f"{path} holds {cfg.name}")
    return place_model(model, device), tokenizer_from_state(text_state)


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


def image_query_tensor(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """Image file bytes -> the normalised 3 x H x W tensor the image tower reads: resized so it covers the
    gallery size (width, height), centre-cropped to it, then normalised by decode_image."""
    width, height = size
    fit = v2.Compose([v2.Resize(max(width, height)), v2.CenterCrop((height, width))])
    with Image.open(io.BytesIO(data)) as img:
        resized = fit(img.convert("RGB"))
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")  # lossless: decode_image sees exactly the resized pixels
    return decode_image(buffer.getvalue())


@torch.no_grad()
def encode_text_query(model: nn.Module, tokenizer, text: str, device: torch.device) -> torch.Tensor:
    """The L2-normalised d-vector of one text, on the CPU."""
    tokens, lengths = tokenizer.batch([text])
    with autocast(device):
        feature = model.encode_text(tokens.to(device), lengths.to(device))
    return F.normalize(feature.float().cpu(), dim=1)[0]


@torch.no_grad()
def encode_image_query(model: nn.Module, image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The L2-normalised d-vector of one 3 x H x W image tensor, on the CPU."""
    with autocast(device):
        feature = model.encode_image(to_device(image[None], device))
    return F.normalize(feature.float().cpu(), dim=1)[0]


def top_k(query: torch.Tensor, gallery: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """(gallery row, cosine) of the k best rows, best first (both sides are unit vectors)."""
    scores, indices = chunked_topk(query[None], gallery, k)
    return [(int(i), float(s)) for i, s in zip(indices[0], scores[0])]


def search_images(model, tokenizer, text: str, shard_dir: Path, split: str, k: int, batch_size: int,
                  device: torch.device) -> tuple[list[Result], int]:
    """(the k gallery images nearest to `text`, the gallery size)."""
    query = encode_text_query(model, tokenizer, text, device)
    image_ids, captions, features = embed_gallery(model, shard_dir, split, batch_size, device)
    check_k(k, len(image_ids), "gallery images", split)
    return [Result(rank, score, image_ids[row], captions[row])
            for rank, (row, score) in enumerate(top_k(query, features, k), start=1)], len(image_ids)


def search_captions(model, tokenizer, image: torch.Tensor, shard_dir: Path, split: str, k: int, batch_size: int,
                    device: torch.device) -> tuple[list[Result], int]:
    """(the k captions of the split nearest to `image`, the number of captions)."""
    query = encode_image_query(model, image, device)
    caption_ids, image_ids, features = embed_captions(model, tokenizer, shard_dir, split, batch_size, device)
    check_k(k, len(caption_ids), "captions", split)
    texts = [text for _, _, text in store.iter_captions(shard_dir, split)]  # the order embed_captions read
    return [Result(rank, score, image_ids[row], texts[row], caption_ids[row])
            for rank, (row, score) in enumerate(top_k(query, features, k), start=1)], len(caption_ids)


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
    """The result images row-major, each fitted into tile x tile, "#rank  score" under each."""
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
        label = f"#{result.rank}  {result.score:.4f}"
        draw.text((x + max(0.0, (tile - draw.textlength(label, font=font)) / 2), y + tile + 2), label,
                  fill="black", font=font)
    grid.save(path)


_STYLE = """body { font-family: sans-serif; margin: 1.5em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 1em; }
figure { margin: 0; } figure img, td img, .query img { width: 160px; image-rendering: pixelated; }
.meta { color: #666; } td { padding: 0.3em 0.6em; vertical-align: middle; } .score { font-family: monospace; }"""


def render_html(query: dict, results: list[Result], meta: str, query_file: str | None) -> str:
    esc = html.escape
    if "text" in query:
        title = query["text"]
        head = f'<h1>Text query</h1>\n<p class="query">{esc(query["text"])}</p>'
        body = ['<div class="grid">']
        for r in results:
            body.append(f'<figure><img src="{esc(r.file)}" alt="rank {r.rank}"><figcaption>'
                        f'<b>#{r.rank}</b> {esc(r.image_id)}<br><span class="score">{r.score:.4f}</span><br>'
                        f'{esc(r.caption)}</figcaption></figure>')
        body.append("</div>")
    else:
        title = query.get("image_id") or query["image"]
        head = (f'<h1>Image query</h1>\n<p class="query"><img src="{esc(query_file or "")}" alt="query"><br>'
                f'{esc(title)}</p>')
        body = ["<table>", "<tr><th>rank</th><th>image</th><th>score</th><th>caption</th><th>caption id</th>"
                           "<th>image id</th></tr>"]
        for r in results:
            body.append(f'<tr><td>{r.rank}</td><td><img src="{esc(r.file)}" alt="{esc(r.image_id)}"></td>'
                        f'<td class="score">{r.score:.4f}</td><td>{esc(r.caption)}</td>'
                        f'<td>{esc(r.caption_id or "")}</td><td>{esc(r.image_id)}</td></tr>')
        body.append("</table>")
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>search: {esc(title)}</title>",
        f"<style>\n{_STYLE}\n</style></head><body>", head, f'<p class="meta">{esc(meta)}</p>', *body,
        f'<p><a href="{GRID_FILE}">{GRID_FILE}</a> · <a href="{RESULTS_FILE}">{RESULTS_FILE}</a></p>',
        "</body></html>", ""])


def print_table(results: list[Result]) -> None:
    captions = any(r.caption_id is not None for r in results)
    header = ["rank", "score", *(["caption_id"] if captions else []), "image_id", "caption"]
    rows = [[str(r.rank), f"{r.score:.4f}", *([r.caption_id or ""] if captions else []), r.image_id,
             r.caption if len(r.caption) <= 70 else r.caption[:67] + "..."] for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(w) if i < 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              + "  " + row[-1])


def write_output(out: Path, query: dict, query_image: bytes | None, results: list[Result], images: dict[str, bytes],
                 meta: dict, tile: int, columns: int) -> None:
    width = max(2, len(str(len(results))))
    with staged_dir(out) as work:
        query_file = None
        if query_image is not None:
            query_file = "query" + image_extension(query_image)
            (work / query_file).write_bytes(query_image)
        for r in results:
            data = images[r.image_id]
            r.file = f"rank{r.rank:0{width}d}{image_extension(data)}"
            (work / r.file).write_bytes(data)
        write_grid(work / GRID_FILE, results, images, tile, columns)
        ranked = "images" if "text" in query else "captions"
        summary = (f"top {len(results)} of {meta['gallery_size']} {ranked} of split {meta['split']!r} "
                   f"({meta['shards']}) by {meta['model']}")
        (work / INDEX_FILE).write_text(render_html(query, results, summary, query_file), encoding="utf-8")
        listed = [asdict(r) for r in results]
        for entry in listed:
            if entry["caption_id"] is None:  # text queries rank images
                del entry["caption_id"]
        record = {"query": {**query, **({"file": query_file} if query_file else {})}, "ranked": ranked, **meta,
                  "k": len(results), "results": listed}
        (work / RESULTS_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- command -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (from the repository root, after `dvc repro` with task: matching):\n"
               "  python -m stages.search --model data/train/model.pt --shards data/shards --text 'a red circle' "
               "--out search/red")
    parser.add_argument("--model", type=Path, required=True, help="an image-text matching checkpoint (dual_encoder)")
    parser.add_argument("--shards", type=store.location, required=True, help=store.LOCATION_HELP)
    parser.add_argument("--split", default="test", help="the split whose gallery is searched (default: test)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="rank the split's gallery images by this caption")
    query.add_argument("--image", type=Path, help="rank the split's captions by this image file")
    query.add_argument("--image-id", help="rank the split's captions by this gallery image of the split")
    parser.add_argument("--k", type=int, default=8, help="results to show (default: 8)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory: index.html, grid.png, results.json, the result images")
    parser.add_argument("--batch-size", type=int, default=256, help="gallery images embedded at once (default: 256)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (default: auto, CUDA when present)")
    parser.add_argument("--tile", type=int, default=128, help="grid.png: each result fitted into tile x tile pixels")
    parser.add_argument("--columns", type=int, default=4, help="grid.png: results per row")
    args = parser.parse_args(argv)
    for name in ("k", "batch_size", "tile", "columns"):
        if getattr(args, name) < 1:
            raise StageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.text is not None and not args.text.strip():
        raise StageError("--text is empty")
    # the query and the split are checked before the model is loaded: a typo fails fast
    n_images = gallery_count(args.shards, args.split)
    if args.text is not None:
        check_k(args.k, n_images, "gallery images", args.split)
        described, query_image = {"text": args.text}, None
    elif args.image is not None:
        described, query_image = {"image": str(args.image)}, read_image_file(args.image)
    else:
        described = {"image_id": args.image_id}
        query_image = gallery_images(args.shards, args.split, {args.image_id}).get(args.image_id)
        if query_image is None:
            raise StageError(f"--image-id {args.image_id!r}: not a gallery image of split {args.split!r} "
                             f"({n_images} images in {args.shards})")

    device = pick_device(args.device)
    model, tokenizer = load_matching_model(args.model, device)
    meta = {"model": str(args.model), "shards": str(args.shards), "split": args.split}
    if args.text is not None:
        results, meta["gallery_size"] = search_images(model, tokenizer, args.text, args.shards, args.split, args.k,
                                                      args.batch_size, device)
    else:
        image = image_query_tensor(query_image, gallery_image_size(args.shards, args.split))
        results, meta["gallery_size"] = search_captions(model, tokenizer, image, args.shards, args.split, args.k,
                                                        args.batch_size, device)
    images = gallery_images(args.shards, args.split, {r.image_id for r in results})
    write_output(args.out, described, query_image, results, images, meta, args.tile, args.columns)
    print_table(results)
    print(f"search: {len(results)} results -> {args.out / INDEX_FILE}")


if __name__ == "__main__":
    run_stage(main)
