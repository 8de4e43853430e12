"""Evaluation protocols on hand-built features whose rankings are worked out in the comments.

Gallery features are one-hot rows (torch.eye), so a query's score for an image is simply the query's
weight on that image's coordinate.
"""
import pytest
import torch

from stages.retrieval.protocols import PROTOCOLS, score


def record(query_id, reference_id, target_id):
    return {"query_id": query_id, "reference_id": reference_id, "target_id": target_id}


def pointing_at(gallery_ids, ranked_ids, away_from=()):
    """A unit query scoring `ranked_ids` 1.0, 0.99, ... in that order, `away_from` -1, all else 0."""
    weights = torch.zeros(len(gallery_ids))
    for rank, image_id in enumerate(ranked_ids):
        weights[gallery_ids.index(image_id)] = 1.0 - 0.01 * rank
    for image_id in away_from:
        weights[gallery_ids.index(image_id)] = -1.0
    return weights / weights.norm()


# --- target -----------------------------------------------------------------------------------------


def test_target_excludes_the_reference_from_its_own_ranking():
    ids = ["a", "b", "c"]
    records = [record("q0", "a", "b"), record("q1", "c", "a")]
    # q0 scores a 1.0 > b 0.5 > c 0: its reference a is the nearest image, so only with a removed is
    #    the target b first (R@1 hit). q1: c (its reference, 0.9) removed, b 1.0 > a 0.2: target a second.
    queries = torch.tensor([[1.0, 0.5, 0.0], [0.2, 1.0, 0.9]])
    result = score("target", ids, ["x", "x", "x"], torch.eye(3), records, queries, ks=[1, 2])
    assert result == {"r1": 50.0, "r2": 100.0, "queries": 2, "gallery": 3}


def test_target_ignores_captions():
    # b shares the target's caption and ranks first: no hit under `target`, a hit under `caption`
    ids, captions = ["a", "b", "c"], ["red", "blue", "blue"]
    records = [record("q0", "a", "c")]
    queries = torch.tensor([[0.0, 1.0, 0.5]])
    assert score("target", ids, captions, torch.eye(3), records, queries, ks=[1])["r1"] == 0.0
    assert score("caption", ids, captions, torch.eye(3), records, queries, ks=[1])["r1"] == 100.0


# --- caption ----------------------------------------------------------------------------------------


def test_caption_hit_is_any_retrieved_image_with_the_target_caption():
    ids = ["i0", "i1", "i2", "i3"]
    captions = ["red dress", "blue dress", "red dress", "green shirt"]
    records = [record("q0", "i3", "i0"), record("q1", "i0", "i2")]
    queries = torch.tensor([
        # q0: reference i3 removed; i2 (1.0) is first. It is not the target i0 but has its caption
        #     "red dress": a hit at 1.
        [0.0, 0.0, 1.0, 0.5],
        # q1: reference i0 removed; i1 "blue dress" (0.8), i3 "green shirt" (0.3), then the target
        #     i2 (0): the two different captions are no hits, the first hit is at 3.
        [1.0, 0.8, 0.0, 0.3],
    ])
    result = score("caption", ids, captions, torch.eye(4), records, queries, ks=[1, 2, 3])
    assert result == {"r1": 50.0, "r2": 50.0, "r3": 100.0, "queries": 2, "gallery": 4}
    # the same rankings judged by exact target: q0 finds i0 only after i2, q1 nothing before rank 3
    assert score("target", ids, captions, torch.eye(4), records, queries, ks=[1])["r1"] == 0.0


def test_caption_ranking_is_the_same_in_small_chunks():
    ids = ["i0", "i1", "i2", "i3"]
    captions = ["red dress", "blue dress", "red dress", "green shirt"]
    records = [record("q0", "i3", "i0"), record("q1", "i0", "i2"), record("q2", "i1", "i3")]
    queries = torch.tensor([[0.0, 0.0, 1.0, 0.5], [1.0, 0.8, 0.0, 0.3], [0.1, 0.9, 0.3, 0.2]])
    whole = score("caption", ids, captions, torch.eye(4), records, queries, ks=[1, 2, 3])
    chunked = score("caption", ids, captions, torch.eye(4), records, queries, ks=[1, 2, 3],
                    query_chunk=1, gallery_chunk=2)
    assert chunked == whole


# --- FashionIQ: VAL/AMC union gallery vs CLIP4Cir split-file gallery -------------------------------
#
# dress: 50 queries, query j = reference d{2j} -> target d{2j+1} (images d000..d099), plus dX, a dress
#        of the split file that no query uses (in the CLIP4Cir gallery only).
#   q0  ranks its own reference d000 first, then 9 other dresses, then the target d001:
#       VAL removes the reference -> target 10th (hit@10); CLIP4Cir keeps it -> 11th (miss@10, hit@50).
#   q1  ranks the distractor dX first, then 9 other dresses, then the target d003:
#       VAL has no dX -> target 10th (hit@10); CLIP4Cir has -> 11th (miss@10, hit@50).
#   the other 48 point straight at their target: rank 1 under both.
#   VAL dress R@10 50/50 = 100, R@50 100; CLIP4Cir dress R@10 48/50 = 96, R@50 100.
# shirt: 40 queries, query j = s{2j} -> s{2j+1} (images s000..s079), no distractor: both protocols see
#        the same 80 images and, no shirt query ranking its reference above its target, give the same.
#   q0  scores its target negative: last (79th of 79 / 80th of 80) -> miss@10, miss@50.
#   q1, q2 rank 19 other shirts above the target: 20th -> miss@10, hit@50.
#   shirt R@10 37/40 = 92.5, R@50 39/40 = 97.5 under both.
# toptee: one gallery image, no queries -> not reported.
#
# VAL:      average R@10 (100 + 92.5)/2 = 96.25, R@50 (100 + 97.5)/2 = 98.75, mean (100+100+92.5+97.5)/4 = 97.5
# CLIP4Cir: average R@10 (96 + 92.5)/2 = 94.25,  R@50 98.75,                  mean (96+100+92.5+97.5)/4 = 96.5
# (pooled over all 90 queries VAL R@10 would be 87/90 = 96.67: the average is per category.)


def fashioniq_toy():
    dresses = [f"d{i:03d}" for i in range(100)]
    shirts = [f"s{i:03d}" for i in range(80)]
    ids = dresses[:50] + ["dX"] + shirts + ["t000"] + dresses[50:]  # categories interleaved on purpose
    captions = ["dress"] * 50 + ["dress"] + ["shirt"] * 80 + ["toptee"] + ["dress"] * 50

    records, queries = [], []
    for j in range(50):
        reference, target = dresses[2 * j], dresses[2 * j + 1]
        if j == 0:
            ranking = [reference] + dresses[2:11] + [target]
        elif j == 1:
            ranking = ["dX"] + dresses[10:19] + [target]
        else:
            ranking = [target]
        records.append(record(f"dress-val-{j}", reference, target))
        queries.append(pointing_at(ids, ranking))
    for j in range(40):
        reference, target = shirts[2 * j], shirts[2 * j + 1]
        if j == 0:
            query = pointing_at(ids, [], away_from=[target])
        elif j in (1, 2):
            query = pointing_at(ids, shirts[10 + 20 * (j - 1) : 29 + 20 * (j - 1)] + [target])
        else:
            query = pointing_at(ids, [target])
        records.append(record(f"shirt-val-{j}", reference, target))
        queries.append(query)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0))  # mix the categories
    return ids, captions, torch.eye(len(ids)), [records[i] for i in order], torch.stack(queries)[order]


def test_fashioniq_val_union_gallery_is_the_query_images_with_reference_removed():
    ids, captions, gallery, records, queries = fashioniq_toy()
    result = score("fashioniq_val_union", ids, captions, gallery, records, queries, ks=[1, 10, 50],
                   query_chunk=16, gallery_chunk=32)
    assert result == {
        "dress": {"r10": 100.0, "r50": 100.0, "queries": 50, "gallery": 100},
        "shirt": {"r10": 92.5, "r50": 97.5, "queries": 40, "gallery": 80},
        "average": {"r10": 96.25, "r50": 98.75},
        "mean": 97.5,
    }


def test_fashioniq_clip4cir_gallery_is_the_split_file_with_reference_kept():
    ids, captions, gallery, records, queries = fashioniq_toy()
    result = score("fashioniq_clip4cir", ids, captions, gallery, records, queries, ks=[10, 50],
                   query_chunk=16, gallery_chunk=32)
    assert result == {
        "dress": {"r10": 96.0, "r50": 100.0, "queries": 50, "gallery": 101},
        "shirt": {"r10": 92.5, "r50": 97.5, "queries": 40, "gallery": 80},
        "average": {"r10": 94.25, "r50": 98.75},
        "mean": 96.5,
    }


# --- errors -----------------------------------------------------------------------------------------


def test_unknown_protocol_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown protocol 'recall'.*" + ", ".join(PROTOCOLS)):
        score("recall", ["a", "b"], ["x", "y"], torch.eye(2), [record("q0", "a", "b")], torch.eye(2)[:1], [1])


@pytest.mark.parametrize("protocol", ["target", "caption"])
@pytest.mark.parametrize("role", ["reference_id", "target_id"])
def test_query_image_outside_the_gallery_is_named(protocol, role):
    query = record("q7", "a", "b") | {role: "zz"}
    with pytest.raises(ValueError, match=f"'q7'.*{role} 'zz'"):
        score(protocol, ["a", "b", "c"], ["x", "y", "z"], torch.eye(3), [query], torch.eye(3)[:1], [1])


@pytest.mark.parametrize("protocol", ["target", "caption"])
def test_k_beyond_the_gallery_less_the_reference_is_refused(protocol):
    # 3 images less the reference leave 2 candidates: R@2 is fine, R@3 is not
    args = (["a", "b", "c"], ["x", "y", "z"], torch.eye(3), [record("q0", "a", "b")], torch.eye(3)[1:2])
    assert score(protocol, *args, ks=[2])["r2"] == 100.0
    with pytest.raises(ValueError, match="evaluate.ks: recall@3"):
        score(protocol, *args, ks=[1, 3])


@pytest.mark.parametrize("protocol", ["fashioniq_val_union", "fashioniq_clip4cir"])
def test_fashioniq_needs_k_10_or_50(protocol):
    ids, captions, gallery, records, queries = fashioniq_toy()
    with pytest.raises(ValueError, match="evaluate.ks"):
        score(protocol, ids, captions, gallery, records, queries, ks=[5, 20, 100])


@pytest.mark.parametrize("protocol", ["fashioniq_val_union", "fashioniq_clip4cir"])
def test_fashioniq_reports_only_the_asked_of_r10_and_r50(protocol):
    ids, captions, gallery, records, queries = fashioniq_toy()
    both = score(protocol, ids, captions, gallery, records, queries, ks=[10, 50])
    only_10 = score(protocol, ids, captions, gallery, records, queries, ks=[1, 10])
    assert set(only_10["average"]) == {"r10"} and only_10["average"]["r10"] == both["average"]["r10"]
    assert only_10["mean"] == only_10["average"]["r10"]


def test_fashioniq_category_gallery_too_small_for_r50():
    # 25 dress queries with distinct images: a 50-image union gallery, 49 candidates after the reference
    ids = [f"d{i:02d}" for i in range(50)]
    records = [record(f"dress-val-{j}", ids[2 * j], ids[2 * j + 1]) for j in range(25)]
    queries = torch.eye(50)[1::2]
    with pytest.raises(ValueError, match="evaluate.ks: recall@50.*'dress' gallery .* offers 49"):
        score("fashioniq_val_union", ids, ["dress"] * 50, torch.eye(50), records, queries, ks=[10, 50])
    # CLIP4Cir keeps the reference: all 50 split-file images are candidates, every query hits at 1
    result = score("fashioniq_clip4cir", ids, ["dress"] * 50, torch.eye(50), records, queries, ks=[10, 50])
    assert result["dress"] == {"r10": 100.0, "r50": 100.0, "queries": 25, "gallery": 50}


@pytest.mark.parametrize("protocol", ["fashioniq_val_union", "fashioniq_clip4cir"])
def test_fashioniq_query_of_unknown_category_is_named(protocol):
    ids, captions, gallery, records, queries = fashioniq_toy()
    records[3] = records[3] | {"query_id": "hat-val-3"}
    with pytest.raises(ValueError, match="'hat-val-3'.*category 'hat'"):
        score(protocol, ids, captions, gallery, records, queries, ks=[10, 50])


def test_fashioniq_clip4cir_target_outside_its_category_is_named():
    ids, captions, gallery, records, queries = fashioniq_toy()
    row = next(i for i, r in enumerate(records) if r["query_id"] == "dress-val-5")
    records[row] = records[row] | {"target_id": "s011"}  # a shirt: not in the dress split file
    with pytest.raises(ValueError, match="'dress-val-5'.*target_id 's011' is not in the 'dress' gallery"):
        score("fashioniq_clip4cir", ids, captions, gallery, records, queries, ks=[10, 50])


@pytest.mark.parametrize("protocol", ["fashioniq_val_union", "fashioniq_clip4cir"])
def test_fashioniq_query_with_unknown_image_is_named(protocol):
    ids, captions, gallery, records, queries = fashioniq_toy()
    records[0] = records[0] | {"target_id": "nope"}
    with pytest.raises(ValueError, match=f"{records[0]['query_id']!r}.*target_id 'nope'"):
        score(protocol, ids, captions, gallery, records, queries, ks=[10, 50])
