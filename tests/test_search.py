"""stages.search on a tiny dual encoder trained by the real `dvc repro train` (task: matching, shapes captions):
text -> gallery images and image -> captions; and on a tiny TIRG (tests/tiny_composed.py): known queries, a gallery
reference or an image file with a text, and the failures of evaluate's per-query results. Every ranking is checked
against cosines recomputed here with the model; the gallery comes from the `index` stage's files."""
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
from stages.index import build_index
from stages.retrieval import per_query
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
    build_index(repo / "data/train/model.pt", repo / "data/shards", ["test"], repo / "data/index", 64, CPU)
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
    repo, model_path, shard_dir = trained
    search.main(["--model", str(model or model_path), "--shards", str(shard_dir), "--index", str(repo / "data/index"),
                 "--device", "cpu", "--out", str(out), *args])
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
    with pytest.raises(StageError, match=re.escape("index built from another model: re-run `dvc repro index`")):
        search_main(trained, tmp_path / "out", "--split", "test", "--text", "a circle", model=composed_checkpoint)
    for args, message in [(["--query-id", "q"], "--query-id asks for a composed-retrieval model"),
                          (["--text", "a", "--image-id", embedded["image_ids"][0]],
                           "takes one of --text, --image, --image-id (got --text, --image-id)")]:
        with pytest.raises(StageError, match=re.escape(message)):
            search_main(trained, tmp_path / "out", "--split", "test", *args)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_the_command_reports_a_bad_request_on_stderr(trained, composed_checkpoint, tmp_path):
    repo, _, _ = trained
    result = subprocess.run([sys.executable, "-m", "stages.search", "--model", str(composed_checkpoint), "--shards",
                             "data/shards", "--text", "a circle", "--device", "cpu", "--out", str(tmp_path / "out")],
                            cwd=repo, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: data/index: index built from another model: re-run `dvc repro index` ")
    assert result.stderr.count("\n") == 1  # one line, no traceback


# --- composed retrieval ------------------------------------------------------------------------------


def composed_main(tiny, out, *args):
    search.main(["--model", str(tiny.model), "--shards", str(tiny.shards), "--index", str(tiny.index), "--split",
                 "test", "--device", "cpu", "--out", str(out), *args])
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def composed(tiny_composed):
    """The test split of the tiny TIRG embedded here (queries composed as evaluate does), and its per-query rows."""
    from stages.retrieval.embedding import embed_queries

    model, tokenizer = load_for_embedding(tiny_composed.model, CPU)
    image_ids, captions, gallery = embed_gallery(model, tiny_composed.shards, "test", 64, CPU)
    records, queries = embed_queries(model, tokenizer, tiny_composed.shards, "test", 64, CPU)
    ranks = {row["query_id"]: row["target_rank"]
             for row in per_query.read_split(tiny_composed.per_query, "test")}
    return {"model": model, "tokenizer": tokenizer, "image_ids": image_ids, "gallery": gallery, "records": records,
            "queries": queries["composed"], "ranks": ranks,
            "image_bytes": {i: d for i, _, d in store.iter_gallery(tiny_composed.shards, "test")}}


def expected_top(query, gallery, image_ids, k, exclude=None):
    """The k best gallery ids by cosine, the reference left out: a plain sort, no stages code."""
    scores = gallery @ query
    if exclude is not None:
        scores[image_ids.index(exclude)] = -math.inf
    order = sorted(range(len(image_ids)), key=lambda i: (-float(scores[i]), i))[:k]
    return [image_ids[i] for i in order], [float(scores[i]) for i in order]


def test_a_known_query_ranks_the_gallery_without_its_reference_and_marks_the_target(tiny_composed, composed,
                                                                                     tmp_path):
    k = 10
    j = next(j for j, r in enumerate(composed["records"]) if composed["ranks"][r["query_id"]] <= 5)
    record = composed["records"][j]
    result = composed_main(tiny_composed, tmp_path / "q", "--query-id", record["query_id"], "--k", str(k))
    ids, scores = expected_top(composed["queries"][j], composed["gallery"], composed["image_ids"], k,
                               record["reference_id"])
    assert [r["image_id"] for r in result["results"]] == ids
    assert [r["score"] for r in result["results"]] == pytest.approx(scores, abs=1e-5)
    assert [r["target"] for r in result["results"]] == [i == record["target_id"] for i in ids]
    assert sum(r["target"] for r in result["results"]) == 1
    assert result["query"] == {**record, "file": "query.png"} and result["ranked"] == "images"
    assert (tmp_path / "q/query.png").read_bytes() == composed["image_bytes"][record["reference_id"]]
    page = (tmp_path / "q/index.html").read_text()
    assert page.count('<span class="badge">target</span>') == 1 and html.escape(record["text"]) in page

    # the same reference and text given as --reference-id: the same ranking, no target to mark
    by_id = composed_main(tiny_composed, tmp_path / "r", "--reference-id", record["reference_id"], "--text",
                          record["text"], "--k", str(k))
    assert [r["image_id"] for r in by_id["results"]] == ids and all("target" not in r for r in by_id["results"])


def test_an_image_file_with_a_text_is_a_composed_query_without_exclusion(tiny_composed, composed, tmp_path):
    record = composed["records"][3]
    with Image.open(io.BytesIO(composed["image_bytes"][record["reference_id"]])) as img:  # padded: cropped back
        padded = Image.new("RGB", (img.width, img.height + 10), "white")
        padded.paste(img.convert("RGB"), (0, 5))
    padded.save(tmp_path / "ref.png")
    result = composed_main(tiny_composed, tmp_path / "f", "--image", str(tmp_path / "ref.png"), "--text",
                           record["text"], "--k", "6")
    ids, _ = expected_top(composed["queries"][3], composed["gallery"], composed["image_ids"], 6)
    assert [r["image_id"] for r in result["results"]] == ids
    assert result["query"] == {"image": str(tmp_path / "ref.png"), "text": record["text"], "file": "query.png"}


def test_failures_list_the_worst_ranked_queries_first(tiny_composed, composed, tmp_path, capsys):
    out = tmp_path / "failures"
    search.main(["--model", str(tiny_composed.model), "--shards", str(tiny_composed.shards), "--index",
                 str(tiny_composed.index), "--failures", str(tiny_composed.per_query), "--split", "test", "--limit",
                 "5", "--out", str(out)])
    record = json.loads((out / "results.json").read_text())
    worst = sorted(composed["ranks"].items(), key=lambda item: -item[1])[:5]
    assert [r["target_rank"] for r in record["failures"]] == [rank for _, rank in worst]
    assert record["which"] == "target" and record["split"] == "test"
    page = (out / "index.html").read_text()
    first = record["failures"][0]
    assert f"{first['target_rank']} of {first['candidates']}" in page and html.escape(first["text"]) in page
    shown = {p.name for p in out.glob("img*")}
    assert len(shown) == len({i for r in record["failures"] for i in (r["reference_id"], r["target_id"], *r["top_ids"])})
    printed = capsys.readouterr().out
    assert printed.index(first["query_id"]) < printed.index(record["failures"][-1]["query_id"])


def test_composed_requests_that_do_not_fit_are_stage_errors(tiny_composed, composed, tmp_path):
    record = composed["records"][0]
    cases = [
        (["--image-id", record["reference_id"]], "--image-id ranks captions with an image-text matching model"),
        (["--query-id", "nope"], "--query-id 'nope': not a query of split 'test'"),
        (["--query-id", record["query_id"], "--text", "x"], "--query-id brings its own reference and text"),
        (["--reference-id", record["reference_id"]], "takes --query-id ID, or a reference"),
        (["--text", "x"], "takes --query-id ID, or a reference"),
        (["--reference-id", "nope", "--text", "x"], "--reference-id 'nope': not a gallery image of split 'test'"),
        (["--failures", str(tiny_composed.per_query), "--text", "x"], "--failures lists the evaluated queries; it "
                                                                      "takes no --text"),
        (["--protocol", "target", "--query-id", record["query_id"]], "--protocol chooses the ranks --failures lists"),
        (["--failures", str(tmp_path), "--limit", "3"], "test.parquet: no per-query results for split 'test'"),
    ]
    for args, message in cases:
        with pytest.raises(StageError, match=re.escape(message)):
            composed_main(tiny_composed, tmp_path / "out", *args)
    assert not (tmp_path / "out").exists()
