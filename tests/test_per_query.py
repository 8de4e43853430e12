"""Per-query ranks and top-k (stages/retrieval/per_query.py) against a brute-force computation written here, on
integer-valued features (exact scores, so ties are real ties), for every composed protocol and both matching
directions; and evaluate's per-query files of a tiny trained model against its own recall."""
import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from stages import evaluate
from stages.common.errors import StageError
from stages.retrieval import per_query
from stages.retrieval.protocols import PROTOCOLS


def integer_features(rows: int, seed: int, dim: int = 4) -> torch.Tensor:
    """Small integers: every dot product is exact in float32, and many are equal."""
    return torch.randint(-2, 3, (rows, dim), generator=torch.Generator().manual_seed(seed)).float()


def brute_force_ranking(scores: dict[int, float], correct: set[int], k: int) -> tuple[int | None, list[int]]:
    """(1 + the number of candidates scoring strictly above the best correct one, the k best candidates by score
    then row), over the candidates that are the keys of `scores`."""
    top = sorted(scores, key=lambda i: (-scores[i], i))[:k]
    if not correct:
        return None, top
    best = max(scores[i] for i in correct)
    return 1 + sum(1 for s in scores.values() if s > best), top


def brute_force_composed(protocol, gallery_ids, captions, gallery, records, queries, k):
    position = {image_id: i for i, image_id in enumerate(gallery_ids)}
    out = []
    for j, record in enumerate(records):
        reference, target = position[record["reference_id"]], position[record["target_id"]]
        category = record["query_id"].split("-", 1)[0]
        if protocol in ("target", "caption"):
            candidates = [i for i in range(len(gallery_ids)) if i != reference]
        elif protocol == "fashioniq_val_union":
            same = [r for r in records if r["query_id"].split("-", 1)[0] == category]
            union = {position[r[role]] for r in same for role in ("reference_id", "target_id")}
            candidates = sorted(union - {reference})
        else:  # fashioniq_clip4cir: the category's images, the reference kept
            candidates = [i for i in range(len(gallery_ids)) if captions[i] == category]
        scores = {i: float(queries[j] @ gallery[i]) for i in candidates}
        if protocol == "caption":
            correct = {i for i in candidates if captions[i] == captions[target]}
        else:
            correct = {target} & set(candidates)
        rank, top = brute_force_ranking(scores, correct, k)
        out.append({"target_rank": rank, "candidates": len(candidates), "top_ids": [gallery_ids[i] for i in top],
                    "top_scores": [scores[i] for i in top]})
    return out


def flat_case():
    """30 gallery images with 5 captions (several images share one), 25 queries; the last one's target is its own
    reference (under `target` no correct candidate is left)."""
    gallery_ids = [f"img{i:02d}" for i in range(30)]
    captions = [f"c{i % 5}" for i in range(30)]
    g = torch.Generator().manual_seed(1)
    records = []
    for j in range(25):
        reference, target = torch.randperm(30, generator=g)[:2].tolist()
        records.append({"query_id": f"q{j}", "reference_id": gallery_ids[reference], "target_id": gallery_ids[target],
                        "text": f"edit {j}"})
    records[-1]["target_id"] = records[-1]["reference_id"]
    return gallery_ids, captions, records


def fashioniq_case():
    """Two categories; each query's reference and target in its own category's images."""
    gallery_ids = [f"img{i:02d}" for i in range(24)]
    captions = ["dress" if i % 2 else "shirt" for i in range(24)]
    g = torch.Generator().manual_seed(2)
    records = []
    for j in range(20):
        category = "dress" if j % 2 else "shirt"
        pool = [i for i in range(24) if captions[i] == category]
        reference, target = (pool[i] for i in torch.randperm(len(pool), generator=g)[:2].tolist())
        records.append({"query_id": f"{category}-{j}", "reference_id": gallery_ids[reference],
                        "target_id": gallery_ids[target], "text": f"edit {j}"})
    return gallery_ids, captions, records


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_composed_ranks_and_top_k_equal_a_brute_force_count(protocol):
    gallery_ids, captions, records = fashioniq_case() if protocol.startswith("fashioniq") else flat_case()
    gallery, queries = integer_features(len(gallery_ids), 3), integer_features(len(records), 4)
    k = 7
    rows = per_query.composed_rows(protocol, gallery_ids, captions, gallery, records, queries, k, query_chunk=6)
    expected = brute_force_composed(protocol, gallery_ids, captions, gallery, records, queries, k)
    assert len(rows) == len(records)
    ties = 0
    for row, want, record in zip(rows, expected, records):
        assert {key: row[key] for key in ("query_id", "reference_id", "target_id", "text")} == record
        assert row["protocol"] == protocol
        assert row["target_rank"] == want["target_rank"], record["query_id"]
        assert row["candidates"] == want["candidates"]
        assert row["top_ids"] == want["top_ids"] and row["top_scores"] == want["top_scores"]
        ties += len(set(want["top_scores"])) < len(want["top_scores"])
    assert ties > 0  # the features do tie: the tie rules above were exercised
    if protocol == "target":
        assert rows[-1]["target_rank"] is None  # its target is its reference, excluded


def test_matching_ranks_equal_a_brute_force_count():
    image_ids = [f"img{i}" for i in range(12)]
    caption_ids = [f"cap{c}" for c in range(36)]
    text_image = torch.tensor([c % 12 for c in range(36)])  # three captions per image
    texts = [f"caption {c}" for c in range(36)]
    images, captions = integer_features(12, 5), integer_features(36, 6)
    k = 5
    rows = per_query.matching_rows(image_ids, images, caption_ids, texts, captions, text_image, k, query_chunk=7)
    assert [r["direction"] for r in rows] == ["t2i"] * 36 + ["i2t"] * 12
    for c, row in enumerate(rows[:36]):
        scores = {i: float(captions[c] @ images[i]) for i in range(12)}
        rank, top = brute_force_ranking(scores, {int(text_image[c])}, k)
        assert (row["query_id"], row["image_id"], row["text"]) == (caption_ids[c], image_ids[c % 12], texts[c])
        assert row["target_rank"] == rank and row["top_ids"] == [image_ids[i] for i in top]
        assert row["top_scores"] == [scores[i] for i in top] and row["candidates"] == 12
    for i, row in enumerate(rows[36:]):
        scores = {c: float(images[i] @ captions[c]) for c in range(36)}
        rank, top = brute_force_ranking(scores, {c for c in range(36) if int(text_image[c]) == i}, k)
        assert (row["query_id"], row["image_id"], row["text"]) == (image_ids[i], image_ids[i], None)
        assert row["target_rank"] == rank and row["top_ids"] == [caption_ids[c] for c in top]


def test_k_beyond_the_candidates_lists_them_all():
    gallery_ids, captions, records = flat_case()
    gallery, queries = integer_features(30, 7), integer_features(25, 8)
    rows = per_query.composed_rows("target", gallery_ids, captions, gallery, records, queries, 100)
    assert all(len(row["top_ids"]) == 29 and row["reference_id"] not in row["top_ids"] for row in rows)


def test_worst_first_and_reading_back(tmp_path):
    rows = [{"protocol": "target", "query_id": "a", "target_rank": 3}, {"protocol": "target", "query_id": "b",
             "target_rank": None}, {"protocol": "caption", "query_id": "a", "target_rank": 9},
            {"protocol": "target", "query_id": "c", "target_rank": 7}, {"protocol": "target", "query_id": "d",
             "target_rank": 3}]
    assert [r["query_id"] for r in per_query.worst_first(rows, "protocol", None)] == ["b", "c", "a", "d"]
    assert [r["query_id"] for r in per_query.worst_first(rows, "protocol", "caption")] == ["a"]
    with pytest.raises(StageError, match="no per-query rows with protocol 'fashioniq_clip4cir'"):
        per_query.worst_first(rows, "protocol", "fashioniq_clip4cir")
    with pytest.raises(StageError, match=r"test.parquet: no per-query results for split 'test' \(no such file"):
        per_query.read_split(tmp_path, "test")
    per_query.write_skipped(tmp_path, "evaluate.per_query_k is 0")
    with pytest.raises(StageError, match=r"\(evaluate.per_query_k is 0;"):
        per_query.read_split(tmp_path, "test")


def test_evaluate_writes_ranks_that_agree_with_its_recall(tiny_composed):
    metrics = json.loads((tiny_composed.root / "metrics.json").read_text())
    for split in ("test", "novel"):
        rows = pq.read_table(tiny_composed.per_query / f"{split}.parquet").to_pylist()
        recall = metrics["composed"][split]["target"]
        assert len(rows) == recall["queries"] and {r["protocol"] for r in rows} == {"target"}
        for k in (1, 5, 10):  # a trained model's float scores do not tie: both rules count the same
            hits = sum(1 for r in rows if r["target_rank"] is not None and r["target_rank"] <= k)
            assert round(100 * hits / len(rows), 2) == recall[f"r{k}"]
        for r in rows:
            assert len(r["top_ids"]) == 10 and r["reference_id"] not in r["top_ids"]
            assert (r["target_rank"] <= 10) == (r["target_id"] in r["top_ids"])
            if r["target_rank"] <= 10:
                assert r["top_ids"][r["target_rank"] - 1] == r["target_id"]


def test_per_query_k_zero_leaves_only_skipped_json(tiny_composed, tmp_path):
    params = yaml.safe_load(tiny_composed.params.read_text())
    params["evaluate"]["per_query_k"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    evaluate.main(["--params", str(tmp_path / "params.yaml"), "--model", str(tiny_composed.model), "--shards",
                   str(tiny_composed.shards), "--out", str(tmp_path / "metrics.json"), "--per-query",
                   str(tmp_path / "per_query")])
    assert [p.name for p in (tmp_path / "per_query").iterdir()] == ["skipped.json"]
    scores = json.loads((tmp_path / "metrics.json").read_text())
    first = json.loads((tiny_composed.root / "metrics.json").read_text())
    # the same numbers; the provenance block says how each run was made (e.g. the thread count another test left)
    assert scores.pop("provenance")["model_sha256"] == first.pop("provenance")["model_sha256"]
    assert scores == first
