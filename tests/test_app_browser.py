"""stages.app in a real browser: Debian's headless Chromium, driven by Selenium through docs/screenshot_app.py (the
README screenshot's script), picks a known query of a tiny TIRG and searches; the ids shown must be the model's top-k
computed here with plain torch (compose, normalise, dot with the gallery, argsort), the target marked."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stages.modeling.factory import load_model
from stages.modeling.text import tokenizer_from_state
from stages.shards import store
from stages.shards.loaders import decode_image
from tiny_repo import REPO

spec = importlib.util.spec_from_file_location("screenshot_app", REPO / "docs" / "screenshot_app.py")
screenshot_app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(screenshot_app)


@pytest.fixture(scope="module")
def browser_ready():
    why = screenshot_app.missing_browser()
    if why:
        pytest.skip(f"no headless browser: {why}")


@torch.no_grad()
def plain_rankings(tiny):
    """{query_id: (record, gallery ids best first)} of the first 20 test queries, by the checkpoint alone."""
    model, _, vocab, _ = load_model(tiny.model)
    tokenizer = tokenizer_from_state(vocab)
    gallery = list(store.iter_gallery(tiny.shards, "test"))
    image_ids = [image_id for image_id, _, _ in gallery]
    features = F.normalize(model.encode_image(torch.stack([decode_image(data) for _, _, data in gallery])), dim=1)
    out = {}
    for query in list(store.iter_queries(tiny.shards, "test"))[:20]:
        tokens, lengths = tokenizer.batch([query["text"]])
        composed = model.compose(model.encode_reference(decode_image(query["ref"])[None]),
                                 model.encode_text(tokens, lengths))
        scores = features @ F.normalize(composed, dim=1)[0]
        scores[image_ids.index(query["reference_id"])] = -float("inf")  # the reference is left out
        order = torch.argsort(scores, descending=True, stable=True)
        out[query["query_id"]] = (query, [image_ids[i] for i in order.tolist()])
    return out


def test_a_known_query_searched_in_the_browser_shows_the_models_top_k(tiny_composed, browser_ready):
    rankings = plain_rankings(tiny_composed)
    # the listed query whose target this model ranks best, and a k that shows it
    query_id, (query, ranked) = min(rankings.items(), key=lambda item: item[1][1].index(item[1][0]["target_id"]))
    k = max(10, ranked.index(query["target_id"]) + 1)
    port = screenshot_app.free_port()
    app = screenshot_app.start_app(tiny_composed.model, tiny_composed.index, tiny_composed.shards,
                                   tiny_composed.per_query, port)
    try:
        driver = screenshot_app.chromium()
        try:
            shown = screenshot_app.search_known_query(driver, f"http://127.0.0.1:{port}/", query_id, k=k)
        finally:
            driver.quit()
    finally:
        screenshot_app.stop_app(app)
    assert [r["image_id"] for r in shown] == ranked[:k]
    assert [r["target"] for r in shown] == [image_id == query["target_id"] for image_id in ranked[:k]]


def test_the_screenshot_script_saves_the_page(tiny_composed, browser_ready, tmp_path):
    out = tmp_path / "figures" / "app.png"
    shown = screenshot_app.screenshot(tiny_composed.model, tiny_composed.index, tiny_composed.shards,
                                      tiny_composed.per_query, out, order="failures", k=8, width=1000, height=700)
    assert len(shown) == 8
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width == 1000
