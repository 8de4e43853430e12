"""Command `export_css3d`: a `shapes` dataset in CSS3D's released layout, so CSS3D-reading code (google/tirg and
fuxianghuang1/GA datasets.py CSSDataset) runs on the embedded data, beside cirflow, on the same images.

    python -m stages.export_css3d --resized data/resized --out data/css3d_export

    <out>/css_toy_dataset_novel2_small.dup.npy   {split: {"objects_img": [[object, ...] per image],
                                                          "mods": [{"from": [i], "to": [j], "to_str": text}]}}
    <out>/images/css_<split>_<index:06d>.png     the resized images, index = the image's place in its split

Every image is its own label (CSSDataset's default when the file has no "labels"), so the release's caption hit is
the exact target, cirflow's `target` protocol. One mod per distinct text of a split, its (from, to) pairs in
manifest order. An object is {"pos": (row, column) centre in [0, 1], "size", "color", "shape"} with CSS's names
(square -> rectangle). The splits are train, test and novel. The output folder appears only once complete. Not a
DVC stage: a command for parity runs (docs/parity.md).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from stages.common.atomic import staged_dir
from stages.common.errors import StageError, run_stage
from stages.datasets import manifest
from stages.datasets.shapes import parse_caption

NPY_FILE = "css_toy_dataset_novel2_small.dup.npy"
CSS_SHAPE = {"square": "rectangle", "circle": "circle", "triangle": "triangle"}


def css_objects(caption: str) -> list[dict]:
    """The objects of a shapes caption as CSS3D's `objects_img` entries."""
    objects = []
    for cell, obj in enumerate(parse_caption(caption)):
        if obj is not None:
            row, column = divmod(cell, 3)
            objects.append({"pos": ((row + 0.5) / 3, (column + 0.5) / 3), "size": obj.size, "color": obj.colour,
                            "shape": CSS_SHAPE[obj.shape]})
    return objects


def export(resized: Path, out: Path) -> dict[str, dict[str, int]]:
    images, queries = manifest.read(resized)
    images, queries = images.to_pylist(), queries.to_pylist()
    if not images or not images[0]["image_id"].startswith("shapes-"):
        raise StageError(f"{resized}: not a shapes dataset (export_css3d reads shapes captions)")
    data, counts, index = {}, {}, {}
    with staged_dir(out) as work:
        (work / "images").mkdir()
        for split in sorted({row["split"] for row in images}):
            rows = [row for row in images if row["split"] == split]
            for i, row in enumerate(rows):
                index[row["image_id"]] = i
                shutil.copyfile(resized / row["path"], work / "images" / f"css_{split}_{i:06d}.png")
            mods: dict[str, dict] = {}
            for query in (q for q in queries if q["split"] == split):
                mod = mods.setdefault(query["text"], {"from": [], "to": [], "to_str": query["text"]})
                mod["from"].append(index[query["reference_id"]])
                mod["to"].append(index[query["target_id"]])
            data[split] = {"objects_img": [css_objects(row["caption"]) for row in rows], "mods": list(mods.values())}
            counts[split] = {"images": len(rows), "mods": len(mods), "queries": sum(len(m["from"]) for m in mods.values())}
        np.save(work / NPY_FILE, np.array(data, dtype=object), allow_pickle=True)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example (from the repository root, after `dvc repro`):\n"
                                            "  python -m stages.export_css3d --resized data/resized --out data/css3d_export")
    parser.add_argument("--resized", type=Path, required=True, help="the `resize` stage's folder of a shapes dataset")
    parser.add_argument("--out", type=Path, required=True, help="output folder in CSS3D's layout")
    args = parser.parse_args(argv)

    def run() -> None:
        counts = export(args.resized, args.out)
        print("export_css3d: " + ", ".join(f"{s} {c['images']} images / {c['mods']} mods / {c['queries']} queries"
                                           for s, c in counts.items()) + f" -> {args.out}")

    run_stage(run)


if __name__ == "__main__":
    main()
