"""Stage `resize`: exact square outputs, aspect kept, corrupt images reported and excluded, resumable."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image, ImageDraw

from stages.datasets import manifest
from stages import resize
from stages.common.atomic import partial_dir
from stages.common.params import ParamsError, parse

PARAMS = dict(size=32, mode="center_crop", pad_value=0, format="png", jpeg_quality=90)
SERIAL = dict(runner="processes", workers=1, address=None, items_per_task=64)  # the `parallel` section


def config(**changes) -> resize.ResizeConfig:
    return parse(resize.ResizeConfig, "resize", {**PARAMS, **changes})


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def square_in_the_middle(width: int, height: int, side: int) -> Image.Image:
    """Black image with a white side x side square at its centre."""
    img = Image.new("RGB", (width, height), (0, 0, 0))
    left, top = (width - side) // 2, (height - side) // 2
    img.paste((255, 255, 255), (left, top, left + side, top + side))
    return img


def write_dataset(root: Path, files: dict[str, bytes], queries: list[tuple[str, str]]) -> Path:
    """A prepared dataset: `files` image_id -> file bytes (all split 'train'), queries (reference, target)."""
    image_rows = []
    for image_id, data in files.items():
        path = f"images/{image_id}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        image_rows.append({"image_id": image_id, "path": path, "split": "train", "caption": f"caption {image_id}"})
    query_rows = [
        {"query_id": f"q{i}", "split": "train", "reference_id": ref, "text": f"make {ref} like {tgt}", "target_id": tgt}
        for i, (ref, tgt) in enumerate(queries)
    ]
    manifest.write(
        root,
        pa.Table.from_pylist(image_rows, schema=manifest.IMAGES_SCHEMA),
        pa.Table.from_pylist(query_rows, schema=manifest.QUERIES_SCHEMA),
    )
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    files = {
        "wide": png_bytes(square_in_the_middle(120, 60, 20)),
        "tall": png_bytes(square_in_the_middle(50, 100, 10)),
        "small": png_bytes(Image.new("L", (10, 7), 200)),  # grey, smaller than the target size
    }
    return write_dataset(tmp_path / "prepared", files, [("wide", "tall"), ("tall", "small")])


def white_box(img: Image.Image) -> tuple[int, int]:
    """Width and height of the bright region."""
    left, top, right, bottom = img.convert("L").point(lambda v: 255 if v > 128 else 0).getbbox()
    return right - left, bottom - top


@pytest.mark.parametrize("mode", ["center_crop", "pad"])
@pytest.mark.parametrize("width,height", [(120, 60), (50, 100), (10, 7), (40, 40)])
def test_output_is_an_exact_rgb_square(mode, width, height):
    out = resize.square(Image.new("RGB", (width, height), (9, 9, 9)), 32, mode, pad_value=0)
    assert out.size == (32, 32) and out.mode == "RGB"


@pytest.mark.parametrize("mode", ["center_crop", "pad"])
@pytest.mark.parametrize("width,height", [(200, 100), (100, 200)])
def test_aspect_ratio_is_kept(mode, width, height):
    out = resize.square(square_in_the_middle(width, height, 40), 50, mode, pad_value=0)
    box_width, box_height = white_box(out)
    assert abs(box_width - box_height) <= 1
    # center_crop scales the shorter side (100 px) to 50; pad scales the longer (200 px) to 50
    expected = 20 if mode == "center_crop" else 10
    assert abs(box_width - expected) <= 1


def test_pad_fills_the_sides_with_pad_value():
    out = resize.square(Image.new("RGB", (200, 100), (0, 0, 0)), 50, "pad", pad_value=77)
    assert out.getpixel((25, 0)) == (77, 77, 77) and out.getpixel((25, 49)) == (77, 77, 77)
    assert out.getpixel((25, 25)) == (0, 0, 0)


@pytest.mark.parametrize("fmt,suffix,pil_format", [("png", ".png", "PNG"), ("jpeg", ".jpg", "JPEG")])
def test_stage_writes_images_and_manifests(dataset, tmp_path, fmt, suffix, pil_format):
    out = tmp_path / "resized"
    summary = resize.run_resize(dataset, out, config(format=fmt))
    assert (summary.images_in, summary.images_out, summary.corrupt, summary.queries_out) == (3, 3, 0, 2)
    images, queries = manifest.read(out)
    assert images.column("image_id").to_pylist() == ["wide", "tall", "small"]
    for path in images.column("path").to_pylist():
        assert path.startswith("images/") and path.endswith(suffix)
        with Image.open(out / path) as img:
            assert (img.size, img.format, img.mode) == ((32, 32), pil_format, "RGB")
    assert queries.num_rows == 2
    report = json.loads((out / resize.REPORT_FILE).read_text())
    assert report == {"images_in": 3, "images_out": 3, "corrupt": [], "queries_in": 2, "queries_out": 2,
                      "queries_dropped": 0}
    assert not list(tmp_path.glob(".resized.partial-*"))


def test_corrupt_images_are_reported_and_excluded(tmp_path, capsys):
    good = png_bytes(square_in_the_middle(60, 40, 10))
    files = {"good": good, "other": good, "truncated": good[: len(good) // 2], "text": b"not an image at all"}
    root = write_dataset(tmp_path / "prepared", files,
                         [("good", "other"), ("good", "truncated"), ("text", "good"), ("other", "good")])
    out = tmp_path / "resized"

    summary = resize.run_resize(root, out, config())  # tests/test_parallel.py: the same in parallel

    report = json.loads((out / resize.REPORT_FILE).read_text())
    corrupt = {entry["image_id"]: entry for entry in report["corrupt"]}
    assert set(corrupt) == {"truncated", "text"}
    assert corrupt["truncated"]["path"] == "images/truncated.png" and corrupt["truncated"]["error"]
    assert corrupt["text"]["path"] == "images/text.png" and "cannot identify" in corrupt["text"]["error"]
    assert (report["images_in"], report["images_out"]) == (4, 2)
    assert (report["queries_in"], report["queries_out"], report["queries_dropped"]) == (4, 2, 2)
    images, queries = manifest.read(out)
    assert images.column("image_id").to_pylist() == ["good", "other"]
    assert queries.column("query_id").to_pylist() == ["q0", "q3"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["good.png", "other.png"]
    assert summary.corrupt == 2
    stderr = capsys.readouterr().err
    assert "images/truncated.png" in stderr and "images/text.png" in stderr


def test_a_missing_image_file_is_reported(dataset, tmp_path):
    (dataset / "images/tall.png").unlink()
    out = tmp_path / "resized"
    resize.run_resize(dataset, out, config())
    report = json.loads((out / resize.REPORT_FILE).read_text())
    assert [(c["image_id"], c["path"]) for c in report["corrupt"]] == [("tall", "images/tall.png")]
    assert "FileNotFoundError" in report["corrupt"][0]["error"]
    assert report["queries_out"] == 0  # both queries name "tall"


def test_resume_keeps_files_of_the_crashed_run(dataset, tmp_path):
    out = tmp_path / "resized"
    cfg = config()
    work = partial_dir(out, resize.resume_key(cfg, dataset))
    done = work / "images/wide.png"
    done.parent.mkdir(parents=True)
    marker = png_bytes(Image.new("RGB", (32, 32), (1, 2, 3)))  # differs from what resize would write
    done.write_bytes(marker)
    (work / "images/.tall.png.tmp-999").write_bytes(b"half written by a killed run")

    summary = resize.run_resize(dataset, out, cfg)

    assert (summary.resumed, summary.resized, summary.images_out) == (1, 2, 3)
    assert (out / "images/wide.png").read_bytes() == marker
    assert sorted(p.name for p in (out / "images").iterdir()) == ["small.png", "tall.png", "wide.png"]
    assert not work.exists()


def test_resume_key_changes_with_params_and_manifest(dataset):
    key = resize.resume_key(config(), dataset)
    assert resize.resume_key(config(size=33), dataset) != key
    (dataset / "images/new.png").write_bytes((dataset / "images/wide.png").read_bytes())
    images, queries = manifest.read(dataset)
    extra = pa.Table.from_pylist([{"image_id": "new", "path": "images/new.png", "split": "train", "caption": ""}],
                                 schema=manifest.IMAGES_SCHEMA)
    manifest.write(dataset, pa.concat_tables([images, extra]), queries)
    assert resize.resume_key(config(), dataset) != key


def test_two_inputs_that_would_share_an_output_file_are_an_error():
    images = pa.Table.from_pylist(
        [{"image_id": "a", "path": "images/x.jpg", "split": "train", "caption": ""},
         {"image_id": "b", "path": "images/x.png", "split": "train", "caption": ""}],
        schema=manifest.IMAGES_SCHEMA,
    )
    with pytest.raises(ValueError, match="'a' and 'b' would both be resized to images/x.png"):
        resize.plan_outputs(images, "png")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"mode": "stretch"}, r"resize\.mode: Input should be 'center_crop' or 'pad'"),
        ({"size": 0}, r"resize\.size: Input should be greater than 0"),
        ({"pad_value": 256}, r"resize\.pad_value: Input should be less than or equal to 255"),
        ({"format": "webp"}, r"resize\.format: Input should be 'png' or 'jpeg'"),
        ({"jpeg_quality": 100}, r"resize\.jpeg_quality: Input should be less than or equal to 95"),
        ({"workers": 2}, r"resize\.workers: unknown key"),  # moved to parallel.workers
        ({"colour": "rgb"}, r"resize\.colour: unknown key"),
    ],
)
def test_bad_params_name_the_key(change, message):
    with pytest.raises(ParamsError, match=message):
        config(**change)


def test_repository_params_parse():
    with open("params.yaml") as f:
        parse(resize.ResizeConfig, "resize", yaml.safe_load(f)["resize"])


def test_cli_exits_2_with_the_key_on_bad_params(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"resize": {**PARAMS, "mode": "stretch"}}))
    with pytest.raises(SystemExit) as exit_info:
        resize.main(["--prepared", str(dataset), "--out", str(tmp_path / "resized")])
    assert exit_info.value.code == 2
    assert "error: params.yaml: resize.mode" in capsys.readouterr().err
    assert not (tmp_path / "resized").exists()


def test_cli_exits_2_on_a_missing_manifest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"resize": PARAMS, "parallel": SERIAL}))
    with pytest.raises(SystemExit) as exit_info:
        resize.main(["--prepared", str(tmp_path / "nothing"), "--out", str(tmp_path / "resized")])
    assert exit_info.value.code == 2
    assert "images.parquet: missing" in capsys.readouterr().err


def test_cli_prints_the_summary(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"resize": PARAMS, "parallel": SERIAL,
                                                          "shard": {"maxcount": "not read"}}))
    resize.main(["--prepared", str(dataset), "--out", str(tmp_path / "resized")])
    assert "resize: images 3 in, 3 out (0 resumed), 0 corrupt; queries 2 in, 2 out" in capsys.readouterr().out


# --- JPEGs decoded at a reduced scale (Image.draft) -----------------------------------------------


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like content: smooth colour gradients, random filled shapes with sharp edges, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    img = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (left, top, left + int(rng.integers(10, width // 3)), top + int(rng.integers(10, height // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photo_jpegs(tmp_path_factory) -> dict[tuple[int, int], Path]:
    """(width, height) -> a quality-90 JPEG; 1000x667 is not a multiple of 8, so drafted pixels are partial."""
    folder = tmp_path_factory.mktemp("photos")
    paths = {}
    for width, height in [(1024, 768), (1000, 667)]:
        paths[width, height] = folder / f"photo_{width}x{height}.jpg"
        photo(width, height).save(paths[width, height], "JPEG", quality=90)
    return paths


def decoded(path: Path, size: int, mode: str) -> tuple[tuple[int, int], resize.Box]:
    """The decoded pixel size and the picture's box when resize decodes `path` for `size` and `mode`."""
    with Image.open(path) as img:
        box = resize.decode_for_size(img, size, mode)
        return img.size, box


@pytest.mark.parametrize(
    "mode,size,expected",
    [
        ("center_crop", 32, (128, 96)),  # 768 // 32 = 24: the largest reduction, 1/8
        ("center_crop", 96, (128, 96)),  # 768 / 8 = 96: just enough for a 96 px shorter side
        ("center_crop", 97, (256, 192)),  # 1/8 would give 96 < 97 rows: 1/4
        ("center_crop", 224, (512, 384)),
        ("center_crop", 385, (1024, 768)),  # 768 / 2 = 384 < 385: no reduction
        ("pad", 128, (128, 96)),  # pad needs only the longer side: 1024 / 8 = 128
        ("pad", 129, (256, 192)),
        ("pad", 224, (256, 192)),
        ("pad", 513, (1024, 768)),
    ],
)
def test_jpegs_are_decoded_at_the_smallest_scale_that_keeps_enough_pixels(photo_jpegs, mode, size, expected):
    (width, height), box = decoded(photo_jpegs[1024, 768], size, mode)
    assert (width, height) == expected
    assert box == (0, 0, width, height)  # 1024 and 768 are multiples of 8: no partial pixels
    needed = min(width, height) if mode == "center_crop" else max(width, height)
    assert needed >= size


@pytest.mark.parametrize("mode", ["center_crop", "pad"])
@pytest.mark.parametrize("size", [31, 64, 100, 224, 333])
def test_the_decoded_picture_never_gets_smaller_than_the_target(photo_jpegs, mode, size):
    (width, height), box = decoded(photo_jpegs[1000, 667], size, mode)
    assert width < 1000 and height < 667  # every size here leaves room for at least 1/2
    picture_width, picture_height = box[2] - box[0], box[3] - box[1]
    # the box is the whole picture: 1000 x 667 at the scale draft picked, partial last pixels left out
    assert picture_width / picture_height == pytest.approx(1000 / 667)
    assert width - 1 < picture_width <= width and height - 1 < picture_height <= height
    side = min(picture_width, picture_height) if mode == "center_crop" else max(picture_width, picture_height)
    assert side >= size


def test_other_formats_are_decoded_in_full(tmp_path):
    path = tmp_path / "photo.png"
    photo(400, 300).save(path)
    assert decoded(path, 32, "center_crop") == ((400, 300), (0, 0, 400, 300))


def mean_abs_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


@pytest.mark.parametrize("mode", ["center_crop", "pad"])
@pytest.mark.parametrize("size", [32, 64, 224, 384, 700])
@pytest.mark.parametrize("shape", [(1024, 768), (1000, 667)])
def test_drafted_output_matches_the_full_decode(photo_jpegs, tmp_path, shape, mode, size):
    """The stage's output against `square` on the fully decoded JPEG.

    Measured mean absolute differences (Pillow 13): 0.2 to 1.6 grey levels, the largest at center_crop
    384 from 1024x768 (decoded at 1/2, exactly 384 rows); 0 where draft cannot reduce. The tolerance,
    2.5, is 1.5x the worst of them (libjpeg versions differ slightly in their scaled IDCTs), and below
    what resizing the drafted 1000x667 without its box gives (2.6 to 13: the partial last decoded
    pixels stretch the picture).
    """
    source = photo_jpegs[shape]
    target = tmp_path / "out.png"
    cfg = config(size=size, mode=mode, format="png")
    assert resize.resize_file(resize.Job("photo", "images/photo.jpg", source, target), cfg) is None
    with Image.open(source) as img:
        img.load()
        reference = resize.square(img, size, mode, pad_value=0)
    with Image.open(target) as out:
        assert out.size == (size, size)
        assert mean_abs_difference(out, reference) < 2.5


def test_a_truncated_jpeg_is_still_reported_when_drafted(photo_jpegs, tmp_path):
    data = photo_jpegs[1024, 768].read_bytes()
    source, target = tmp_path / "truncated.jpg", tmp_path / "out.png"
    source.write_bytes(data[: len(data) // 2])
    error = resize.resize_file(resize.Job("t", "images/t.jpg", source, target), config(size=32))
    assert error is not None and "truncated" in error
    assert not target.exists()
