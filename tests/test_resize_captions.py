"""resize passes an image-text dataset's captions.parquet and folds.json on, minus corrupt images."""
import json

import pyarrow as pa
from PIL import Image

from stages.datasets import captions, manifest
from stages.common.params import parse
from stages.resize import ResizeConfig, run_resize


def test_captions_and_folds_follow_the_images_that_survive(tmp_path):
    src = tmp_path / "prepared"
    (src / "images").mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (20, 10), (200, 10, 10)).save(src / "images" / f"{name}.jpg")
    (src / "images" / "c.jpg").write_bytes(b"not a jpeg")
    images = pa.Table.from_pylist([{"image_id": n, "path": f"images/{n}.jpg", "split": "test", "caption": f"{n} 0"}
                                   for n in "abc"], schema=manifest.IMAGES_SCHEMA)
    manifest.write(src, images, pa.Table.from_pylist([], schema=manifest.QUERIES_SCHEMA))
    captions.write(src, captions.table([{"caption_id": f"{n}{i}", "image_id": n, "split": "test", "text": f"{n} {i}"}
                                        for n in "abc" for i in range(2)]), images)
    (src / captions.FOLDS_FILE).write_text(json.dumps({"0": ["a", "c"], "1": ["b"]}))

    cfg = parse(ResizeConfig, "resize", dict(size=8, mode="center_crop", pad_value=0, format="png",
                                             jpeg_quality=90))
    run_resize(src, tmp_path / "resized", cfg)

    kept = captions.read(tmp_path / "resized")
    assert sorted(kept.column("caption_id").to_pylist()) == ["a0", "a1", "b0", "b1"]
    assert json.loads((tmp_path / "resized" / captions.FOLDS_FILE).read_text()) == {"0": ["a"], "1": ["b"]}
    report = json.loads((tmp_path / "resized" / "report.json").read_text())
    assert (report["captions_in"], report["captions_out"]) == (6, 4)
