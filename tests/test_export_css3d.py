"""stages.export_css3d: the shapes data in CSS3D's released layout, read back the way CSSDataset reads it."""
import numpy as np
import pytest

from stages import export_css3d
from stages.datasets import manifest
from test_loaders import data  # noqa: F401  (the module-scoped shard fixture: prepared, resized, shards)


def test_the_export_reads_back_as_the_release_reads_css3d(data, tmp_path):  # noqa: F811
    out = tmp_path / "css"
    counts = export_css3d.export(data / "resized", out)
    images, queries = manifest.read(data / "resized")
    images, queries = images.to_pylist(), queries.to_pylist()
    # as google/tirg datasets.py CSSDataset.__init__ does (the release adds allow_pickle for numpy >= 1.16.3)
    css = np.load(out / export_css3d.NPY_FILE, encoding="latin1", allow_pickle=True).item()
    assert set(css) == {"train", "test", "novel"}
    for split in css:
        rows = [row for row in images if row["split"] == split]
        split_queries = [q for q in queries if q["split"] == split]
        assert counts[split] == {"images": len(rows), "mods": len({q["text"] for q in split_queries}),
                                 "queries": len(split_queries)}
        assert len(css[split]["objects_img"]) == len(rows)
        # generate_test_queries_: one (source, target, text) per (from, to) of every mod
        released = {(rows[i]["image_id"], mod["to_str"], rows[j]["image_id"])
                    for mod in css[split]["mods"] for i, j in zip(mod["from"], mod["to"])}
        assert released == {(q["reference_id"], q["text"], q["target_id"]) for q in split_queries}
        for i, row in enumerate(rows):  # get_img: the same bytes as cirflow's resized image
            assert (out / "images" / f"css_{split}_{i:06d}.png").read_bytes() == (data / "resized" / row["path"]).read_bytes()
    first = images[0]
    objects = css[first["split"]]["objects_img"][0]
    assert len(objects) == first["caption"].count(" at ")
    assert {o["shape"] for o in objects} <= {"circle", "rectangle", "triangle"}
    assert all(0 < o["pos"][0] < 1 and 0 < o["pos"][1] < 1 for o in objects)


def test_a_dataset_other_than_shapes_is_refused(tmp_path):
    import pyarrow as pa

    d = tmp_path / "other"
    d.mkdir()
    (d / "images").mkdir()
    (d / "images" / "a.png").write_bytes(b"")
    images = pa.Table.from_pylist([{"image_id": "fiq-1", "path": "images/a.png", "split": "train", "caption": "x"}],
                                  schema=manifest.IMAGES_SCHEMA)
    queries = pa.Table.from_pylist([], schema=manifest.QUERIES_SCHEMA)
    manifest.write(d, images, queries)
    with pytest.raises(export_css3d.StageError, match="not a shapes dataset"):
        export_css3d.export(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()
