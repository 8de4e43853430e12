"""Query a trained model in the browser: a local web page over the model, its feature index (the `index` stage) and
the shards. A command, not a DVC stage.

    python -m stages.app --model data/train/model.pt --index data/index --shards data/shards \
        --per-query data/evaluate                  # then open http://127.0.0.1:8000

Composed retrieval: pick a split, then a known query (listed; with --per-query also worst target rank first), a
reference from the split's gallery (a paged grid) or an uploaded image, type or edit the modification and see the
top-k with their scores, the target marked when the query is a known one. Image-text matching: a text ranks the
gallery images, a gallery image or an uploaded one ranks the captions.

The server binds 127.0.0.1 (this machine only) unless --host says otherwise. Uploads are capped in bytes (by the
announced length and while the body streams: 413) and in pixels (read from the image header before decoding, with
Pillow's decompression-bomb warning turned into an error: 413); only PNG, JPEG, WEBP, GIF and BMP are decoded, as
Pillow recognises them from the bytes (415 otherwise); a damaged one is a 400 with a message, never a traceback.
Only gallery images are served, looked up by id in memory: no path from a request reaches the filesystem.
Checkpoints load with torch.load(weights_only=True) (stages.modeling.factory.load_model).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stages.common.device import pick_device
from stages.common.errors import StageError, run_stage
from stages.shards import store
from stages.web import uploads

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (from the repository root, after `dvc repro`):\n  python -m stages.app --model "
               "data/train/model.pt --index data/index --shards data/shards --per-query data/evaluate")
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint the index was built from")
    parser.add_argument("--index", type=Path, default=Path("data/index"),
                        help="the `index` stage's folder (default: data/index)")
    parser.add_argument("--shards", type=store.location, required=True, help=store.LOCATION_HELP)
    parser.add_argument("--per-query", type=Path,
                        help="evaluate's per-query folder (data/evaluate): lists known queries worst target rank first")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"the address to bind (default: {DEFAULT_HOST}, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default: {DEFAULT_PORT})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (default: auto, CUDA when present)")
    parser.add_argument("--max-upload-bytes", type=int, default=uploads.MAX_BYTES,
                        help=f"the largest upload accepted (default: {uploads.MAX_BYTES})")
    parser.add_argument("--max-pixels", type=int, default=uploads.MAX_PIXELS,
                        help=f"the largest uploaded image, width x height (default: {uploads.MAX_PIXELS})")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        raise StageError(f"--port {args.port}: not a TCP port")
    for name in ("max_upload_bytes", "max_pixels"):
        if getattr(args, name) < 1:
            raise StageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from stages.web.server import Engine, create_app

    args = parse_args(argv)
    engine = Engine(args.model, args.index, args.shards, args.per_query, pick_device(args.device))
    app = create_app(engine, args.max_upload_bytes, args.max_pixels)
    print(f"app: {engine.task} model {engine.model_name}, splits {', '.join(engine.splits)}: "
          f"http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_stage(main)
