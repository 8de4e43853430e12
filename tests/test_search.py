"""stages.search on a tiny dual encoder trained by the real `dvc repro train` (task: matching, shapes captions):
text -> gallery images and image -> captions, checked against cosines recomputed here with the model."""
import html
import io
import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stages import search
from stages.shards import store
from stages.common.errors import StageError
from stages.retrieval.embedding import embed_captions, embed_gallery, load_for_embedding
from stages.modeling.factory import ModelConfig, build_model, save_model
from stages.common.params import parse
from stages.modeling.text import tokenizer_from_state
from test_matching_pipeline import switch_to_matching
from tiny_repo import make_tiny_repo, run

CPU = torch.device("cpu")
QUERY = 'a small red circle <script>&"'  # html.escape must turn every one of <, >, & and " into an entity


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(the tiny repo, its data/train/model.pt, its data/shards)."""
    repo = make_tiny_repo(tmp_path_factory.mktemp("search"))
    switch_to_matching(repo)
    run(["dvc", "repro", "train"], repo)
    return repo, repo / "data/train/model.pt", repo / "data/shards"


@pytest.fixture(scope="module")
def embedded(trained):
    """The test split embedded here, independently of stages.search."""
    _, model_path, shard_dir = trained
    model, tokenizer = load_for_embedding(model_path, CPU)
    image_ids, captions, images = embed_gallery(model, shard_dir, "test", 64, CPU)
    caption_ids, caption_images, texts = embed_captions(model, tokenizer, shard_dir, "test", 64, CPU)
    image_bytes = {image_id: data for image_id, _, data in store.iter_gallery(shard_dir, "test")}
    caption_text = {caption_id: text for caption_id, _, text in store.iter_captions(shard_dir, "test")}
    return {"model": model, "tokenizer": tokenizer, "image_ids": image_ids, "captions": captions, "images": images,
            "caption_ids": caption_ids, "caption_images": caption_images, "texts": texts,
            "image_bytes": image_bytes, "caption_text": caption_text}


def search_main(trained, out, *args, model=None):
    _, model_path, shard_dir = trained
    search.main(["--model", str(model or model_path), "--shards", str(shard_dir), "--device", "cpu",
                 "--out", str(out), *args])
    return json.loads((out / "results.json").read_text())


def check_ranked(results, k):
    assert [r["rank"] for r in results] == list(range(1, k + 1))
    scores = [r["score"] for r in results]
    assert all(a >= b for a, b in zip(scores, scores[1:]))


def grid_size(k, tile, columns):
    cols, rows = min(k, columns), math.ceil(k / min(k, columns))
    return cols * tile + (cols + 1) * search.PAD, rows * (tile + search.LABEL_HEIGHT) + (rows + 1) * search.PAD


def test_a_text_ranks_the_gallery_images_by_cosine(trained, embedded, tmp_path, capsys):
    k, out = 6, tmp_path / "text"
    record = search_main(trained, out, "--split", "test", "--text", QUERY, "--k", str(k))
    results = record["results"]
    check_ranked(results, k)
    assert record["query"] == {"text": QUERY} and record["ranked"] == "images"
    assert record["gallery_size"] == len(embedded["image_ids"])

    model, tokenizer = embedded["model"], embedded["tokenizer"]
    with torch.no_grad():
        tokens, lengths = tokenizer.batch([QUERY])
        query = F.normalize(model.encode_text(tokens, lengths), dim=1)[0]
    cosines = embedded["images"] @ query
    row = {image_id: i for i, image_id in enumerate(embedded["image_ids"])}
    assert len({r["image_id"] for r in results}) == k
    for r in results:
        assert r["score"] == pytest.approx(float(cosines[row[r["image_id"]]]), abs=1e-5)
        assert r["caption"] == embedded["captions"][row[r["image_id"]]]
    best = torch.sort(cosines, descending=True).values[:k].tolist()
    assert [r["score"] for r in results] == pytest.approx(best, abs=1e-5)  # the top k, not just k of them

    page = (out / "index.html").read_text()
    assert html.escape(QUERY) in page and "<script>" not in page
    for r in results:
        assert r["file"] in page and html.escape(r["caption"]) in page and f"{r['score']:.4f}" in page
        assert (out / r["file"]).read_bytes() == embedded["image_bytes"][r["image_id"]]
    assert [r["file"] for r in results] == [f"rank{i:02d}.png" for i in range(1, k + 1)]
    with Image.open(out / "grid.png") as grid:
        assert grid.size == grid_size(k, 128, 4)  # the defaults: 4 columns of 128 px tiles, here 2 rows
    printed = capsys.readouterr().out
    assert all(r["image_id"] in printed and f"{r['score']:.4f}" in printed for r in results)
    assert not list(tmp_path.glob(".text.partial-*"))


def test_a_gallery_image_ranks_the_captions_by_cosine(trained, embedded, tmp_path):
    k, out = 5, tmp_path / "image"
    image_id = embedded["image_ids"][5]
    record = search_main(trained, out, "--split", "test", "--image-id", image_id, "--k", str(k),
                         "--tile", "40", "--columns", "3")
    results = record["results"]
    check_ranked(results, k)
    assert record["query"] == {"image_id": image_id, "file": "query.png"} and record["ranked"] == "captions"

    # the query through the image tower is the gallery vector of that image, embedded here by embed_gallery
    query = embedded["images"][embedded["image_ids"].index(image_id)]
    cosines = embedded["texts"] @ query
    row = {caption_id: i for i, caption_id in enumerate(embedded["caption_ids"])}
    for r in results:
        assert r["score"] == pytest.approx(float(cosines[row[r["caption_id"]]]), abs=1e-5)
        assert r["image_id"] == embedded["caption_images"][row[r["caption_id"]]]
        assert r["caption"] == embedded["caption_text"][r["caption_id"]]
    best = torch.sort(cosines, descending=True).values[:k].tolist()
    assert [r["score"] for r in results] == pytest.approx(best, abs=1e-5)

    assert (out / "query.png").read_bytes() == embedded["image_bytes"][image_id]
    page = (out / "index.html").read_text()
    assert 'src="query.png"' in page and html.escape(image_id) in page
    for r in results:
        assert r["file"] in page and html.escape(r["caption"]) in page and html.escape(r["caption_id"]) in page
        assert (out / r["file"]).read_bytes() == embedded["image_bytes"][r["image_id"]]
    with Image.open(out / "grid.png") as grid:
        assert grid.size == grid_size(k, 40, 3)


def test_an_image_file_is_resized_and_cropped_to_the_gallery_size(trained, embedded, tmp_path):
    """The gallery image padded to 32 x 48 comes back to the same 32 x 32 pixels: the same ranking as --image-id."""
    image_id = embedded["image_ids"][5]
    with Image.open(io.BytesIO(embedded["image_bytes"][image_id])) as img:
        width, height = img.size
        padded = Image.new("RGB", (width, height + 16), "white")
        padded.paste(img.convert("RGB"), (0, 8))
    padded.save(tmp_path / "query.png")
    by_file = search_main(trained, tmp_path / "file", "--split", "test", "--image", str(tmp_path / "query.png"),
                          "--k", "5")
    by_id = search_main(trained, tmp_path / "id", "--split", "test", "--image-id", image_id, "--k", "5")
    assert by_file["query"] == {"image": str(tmp_path / "query.png"), "file": "query.png"}
    assert [r["caption_id"] for r in by_file["results"]] == [r["caption_id"] for r in by_id["results"]]
    assert [r["score"] for r in by_file["results"]] == pytest.approx([r["score"] for r in by_id["results"]],
                                                                      abs=1e-6)
    assert (tmp_path / "file/query.png").read_bytes() == (tmp_path / "query.png").read_bytes()


@pytest.fixture(scope="module")
def composed_checkpoint(trained, tmp_path_factory):
    """A (untrained) TIRG checkpoint with the tiny model's vocabulary: a composed-retrieval model."""
    _, model_path, _ = trained
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    cfg = parse(ModelConfig, "model", {**state["model_config"], "name": "tirg"})
    model = build_model(cfg, len(tokenizer_from_state(state["vocab"])), state["image_size"], load_weights=False)
    path = tmp_path_factory.mktemp("tirg") / "model.pt"
    save_model(path, model, cfg, state["vocab"], state["image_size"])
    return path


def test_bad_requests_are_stage_errors(trained, embedded, composed_checkpoint, tmp_path):
    n_images, n_captions = len(embedded["image_ids"]), len(embedded["caption_ids"])
    cases = [
        (["--split", "nope", "--text", "a circle"], "no split 'nope'"),
        (["--split", "test", "--image", str(tmp_path / "missing.png")], "missing.png: no such file"),
        (["--split", "test", "--image", __file__], "not an image file"),
        (["--split", "test", "--image-id", "no-such-image"], "--image-id 'no-such-image': not a gallery image"),
        (["--split", "test", "--text", "a circle", "--k", str(n_images + 1)],
         f"has {n_images} gallery images; k must be in 1..{n_images}"),
        (["--split", "test", "--image-id", embedded["image_ids"][0], "--k", str(n_captions + 1)],
         f"has {n_captions} captions; k must be in 1..{n_captions}"),
        (["--split", "test", "--text", "a circle", "--k", "0"], "--k must be at least 1"),
        (["--split", "test", "--text", "  "], "--text is empty"),
    ]
    for args, message in cases:
        with pytest.raises(StageError, match=re.escape(message)):
            search_main(trained, tmp_path / "out", *args)
    with pytest.raises(StageError) as err:
        search_main(trained, tmp_path / "out", "--split", "test", "--text", "a circle", model=composed_checkpoint)
    assert str(err.value) == (f"search needs an image-text matching model (model.name dual_encoder); "
                              f"{composed_checkpoint} holds tirg")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_the_command_reports_a_bad_request_on_stderr(trained, composed_checkpoint, tmp_path):
    repo, _, _ = trained
    result = subprocess.run([sys.executable, "-m", "stages.search", "--model", str(composed_checkpoint), "--shards",
                             "data/shards", "--text", "a circle", "--device", "cpu", "--out", str(tmp_path / "out")],
                            cwd=repo, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: search needs an image-text matching model (model.name dual_encoder); "
                                     f"{composed_checkpoint} holds tirg")
