"""task: matching on COCO-Karpathy-format data, every stage in-process with the CLI arguments of dvc.yaml:
prepare -> resize -> shard -> vocabulary -> pretrain -> mine -> train (AOQ) -> evaluate (5K-style whole
split and the 1K-style fold average from the adapter's folds.json).

The data is test_coco.py's hand-written dataset_coco.json (documented Karpathy record format; no real
excerpt exists, see ../shared/fixtures/mscoco_karpathy/PROVENANCE.md) with generated JPEGs:
5 test images, 2 val (one file missing, dropped), 2 train + 1 restval (joins train), 5 captions each.
"""
from __future__ import annotations

import copy
import json
import time
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from stages import evaluate, index, mine, prepare, pretrain, resize, shard, train, vocabulary
from stages.shards import store
from stages.retrieval.embedding import embed_captions, embed_gallery, load_for_embedding
from stages.retrieval.matching_metrics import i2t_t2i
from test_coco import MISSING, coco_records, coco_sources
from karpathy_files import write_karpathy
from tiny_repo import REPO

CAPTIONS_PER_IMAGE = 5
FOLDS = 2  # 5 test images -> folds of 2 (one image left over): both folds non-empty
I2T_K, T2I_K, CANDIDATE_RANGE = 8, 2, 6  # train: 3 images x 5 captions; i2t_k <= 15 - 5, t2i_k <= 3 - 1;
#                                         range 6 draws t2i column (6 - 1) // 5 = 1 < T2I_K
SPLITS = ["test", "val"]
KS = (1, 5, 10)
TINY_MODEL = {"name": "dual_encoder", "embed_dim": 16,
              "image": {"encoder": "small_cnn", "weights": None, "channels": [8, 8]},
              "text": {"encoder": "lstm", "embed_dim": 8, "hidden_dim": 8, "dropout": 0.0}}
LOOP = dict(batch_size=5, workers=0, shuffle_buffer=15, device="cpu", log_every=1, checkpoint_every=2)

# The commands of dvc.yaml, minus `python -m stages.<name>`.
COMMANDS = [
    (prepare, ["--out", "data/prepared"]),
    (resize, ["--prepared", "data/prepared", "--out", "data/resized"]),
    (shard, ["--resized", "data/resized", "--out", "data/shards"]),
    (vocabulary, ["--shards", "data/shards", "--out", "data/vocab"]),
    (pretrain, ["--shards", "data/shards", "--vocab", "data/vocab", "--out", "data/pretrain",
                "--metrics", "metrics/pretrain.json"]),
    (mine, ["--model", "data/pretrain/model.pt", "--shards", "data/shards", "--out", "data/mined"]),
    (train, ["--init", "data/pretrain/model.pt", "--shards", "data/shards", "--mined", "data/mined",
             "--out", "data/train", "--metrics", "metrics/train.json"]),
    (evaluate, ["--model", "data/train/model.pt", "--shards", "data/shards", "--out", "metrics/evaluate.json",
                "--per-query", "data/evaluate"]),
    (index, ["--model", "data/train/model.pt", "--shards", "data/shards", "--out", "data/index"]),
]


def matching_params(raw) -> dict:
    params = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["task"] = "matching"
    params["dataset"]["name"] = "coco"
    params["dataset"]["coco"].update(raw_dir=str(raw), images_dir=str(raw / "images"), karpathy_url=None,
                                     download_images=False, restval_as_train=True,
                                     captions_per_image=CAPTIONS_PER_IMAGE, on_missing="drop", expect_full=False,
                                     folds=FOLDS)
    params["resize"].update(size=32)
    params["parallel"].update(workers=1)
    params["vocabulary"].update(texts="captions", split="train", glove_path=None)
    params["model"].update(copy.deepcopy(TINY_MODEL))
    params["loss"]["name"] = "info_nce"
    params["pretrain"].update(steps=3, **LOOP)
    params["mine"].update(aoq_i2t_k=I2T_K, aoq_t2i_k=T2I_K, batch_size=16, device="cpu")
    params["train"].update(steps=2, offline_negatives=True, aoq_candidate_range=CANDIDATE_RANGE, **LOOP)
    params["evaluate"].update(splits=SPLITS, matching_ks=list(KS), batch_size=16, device="cpu")
    return params


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    """The tmp repo after the whole pipeline, and each stage's seconds."""
    root = tmp_path_factory.mktemp("coco_matching")
    raw = root / "raw"
    records = coco_records()
    write_karpathy(raw / "dataset_coco.json", records, "coco")
    coco_sources(raw / "images", records)
    (root / "params.yaml").write_text(yaml.safe_dump(matching_params(raw), sort_keys=False))
    seconds = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for module, argv in COMMANDS:
            began = time.perf_counter()
            module.main(argv)
            seconds[module.__name__.removeprefix("stages.")] = round(time.perf_counter() - began, 2)
    print("stage seconds:", seconds)
    return root, seconds


def prepared_counts(root) -> dict[str, dict[str, int]]:
    """{split: {images, captions}} from the prepared captions.parquet."""
    rows = pq.read_table(root / "data/prepared/captions.parquet").to_pylist()
    captions = Counter(r["split"] for r in rows)
    images = Counter(split for split, _ in {(r["split"], r["image_id"]) for r in rows})
    return {split: {"images": images[split], "captions": captions[split]} for split in captions}


def test_every_stage_ran(coco_run):
    root, seconds = coco_run
    assert list(seconds) == [module.__name__.removeprefix("stages.") for module, _ in COMMANDS]
    assert json.loads((root / "metrics/pretrain.json").read_text())["steps"] == 3
    assert json.loads((root / "metrics/train.json").read_text())["steps"] == 2
    vocab = json.loads((root / "data/vocab/vocab.json").read_text())
    assert vocab["texts"] == 15 and "restval" in vocab["words"]  # the train + restval captions


def test_prepared_counts_are_the_fixture(coco_run):
    root, _ = coco_run
    counts = prepared_counts(root)
    # 10 images in the JSON, val's MISSING dropped, restval joined train
    assert counts == {"test": {"images": 5, "captions": 25}, "val": {"images": 1, "captions": 5},
                      "train": {"images": 3, "captions": 15}}
    ingest = json.loads((root / "data/prepared/ingest_report.json").read_text())
    assert ingest["missing_images"][0]["image_id"] == MISSING.removesuffix(".jpg")


def test_shards_carry_every_caption_and_the_folds(coco_run):
    root, _ = coco_run
    shard_dir = root / "data/shards"
    store.verify(shard_dir)
    counts = prepared_counts(root)
    for split in ("train", "val", "test"):
        triples = list(store.iter_captions(shard_dir, split))
        per_image = Counter(image_id for _, image_id, _ in triples)
        assert len(per_image) == counts[split]["images"]
        assert set(per_image.values()) == {CAPTIONS_PER_IMAGE}
        assert len(triples) == CAPTIONS_PER_IMAGE * counts[split]["images"] == counts[split]["captions"]
    folds = store.read_folds(shard_dir)
    assert folds == json.loads((root / "data/prepared/folds.json").read_text())
    test_ids = [image_id for image_id, _, _ in store.iter_gallery(shard_dir, "test")]
    assert folds == {"0": test_ids[0:2], "1": test_ids[2:4]}  # Karpathy order, the fifth left over


def test_candidates_have_the_aoq_shapes(coco_run):
    root, _ = coco_run
    with np.load(root / "data/mined/candidates.npz") as data:
        i2t, t2i = data["i2t"], data["t2i"]
        image_ids, caption_ids = data["image_ids"].tolist(), data["caption_ids"].tolist()
    train_captions = list(store.iter_captions(root / "data/shards", "train"))
    assert len(image_ids) == 3 and len(caption_ids) == len(train_captions) == 15
    assert i2t.shape == (len(image_ids), I2T_K) and t2i.shape == (len(caption_ids), T2I_K)
    image_of = {caption_id: image_id for caption_id, image_id, _ in train_captions}
    row_of_image = {image_id: row for row, image_id in enumerate(image_ids)}
    for row, candidates in enumerate(i2t):  # never an image's own caption
        assert all(image_of[caption_ids[c]] != image_ids[row] for c in candidates)
    for row, candidates in enumerate(t2i):  # never a caption's own image
        assert row_of_image[image_of[caption_ids[row]]] not in candidates.tolist()


def check_recalls(scores: dict) -> None:
    for direction in ("i2t", "t2i"):
        r = scores[direction]
        assert set(r) == {"r1", "r5", "r10", "medr", "meanr"}
        assert 0 <= r["r1"] <= r["r5"] <= r["r10"] <= 100
    assert scores["rsum"] == pytest.approx(sum(scores[d][f"r{k}"] for d in ("i2t", "t2i") for k in KS), abs=0.05)


def test_metrics_have_the_5k_and_1k_paths(coco_run):
    root, _ = coco_run
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    counts = prepared_counts(root)
    assert set(metrics) == {*SPLITS, "provenance"}
    for split in SPLITS:
        check_recalls(metrics[split]["all"])
        assert metrics[split]["counts"] == counts[split]
    check_recalls(metrics["test"]["folds_average"])
    assert "folds_average" not in metrics["val"]  # folds.json names test images only


def test_metrics_match_a_recomputation_per_fold(coco_run):
    """`all` is the whole test split; `folds_average` the mean of each fold's own images and captions."""
    root, _ = coco_run
    metrics = json.loads((root / "metrics/evaluate.json").read_text())["test"]
    shard_dir = root / "data/shards"
    model, tokenizer = load_for_embedding(root / "data/train/model.pt", torch.device("cpu"))
    image_ids, _, images = embed_gallery(model, shard_dir, "test", 16, torch.device("cpu"))
    _, caption_images, texts = embed_captions(model, tokenizer, shard_dir, "test", 16, torch.device("cpu"))
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    text_image = torch.tensor([row[i] for i in caption_images])
    assert i2t_t2i(images, texts, text_image, KS) == metrics["all"]

    per_fold = []
    for ids in store.read_folds(shard_dir).values():
        rows = [row[i] for i in ids]
        keep = [c for c, i in enumerate(caption_images) if i in ids]
        local = torch.tensor([rows.index(row[caption_images[c]]) for c in keep])
        per_fold.append(i2t_t2i(images[rows], texts[keep], local, KS))
    for direction in ("i2t", "t2i"):
        for key in ("r1", "r5", "r10", "medr", "meanr"):
            mean = sum(f[direction][key] for f in per_fold) / len(per_fold)
            assert metrics["folds_average"][direction][key] == pytest.approx(mean, abs=0.01)
    assert metrics["folds_average"]["rsum"] == pytest.approx(sum(f["rsum"] for f in per_fold) / len(per_fold),
                                                             abs=0.05)


def test_per_query_ranks_agree_with_the_recall_and_the_index_holds_the_captions(coco_run):
    """evaluate --per-query: the captions' t2i ranks give back the metrics' R@K, an image's i2t rank is its best
    caption's; the index stage's caption features are the ones evaluate ranked."""
    root, _ = coco_run
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    for split in SPLITS:
        rows = pq.read_table(root / "data/evaluate" / f"{split}.parquet").to_pylist()
        t2i = [r for r in rows if r["direction"] == "t2i"]
        assert len(t2i) == metrics[split]["counts"]["captions"]
        assert all(len(set(r["top_scores"])) == len(r["top_scores"]) for r in t2i)  # distinct images: no ties
        for k in KS:  # without ties every tie rule counts the same
            assert round(100 * sum(r["target_rank"] <= k for r in t2i) / len(t2i), 2) == \
                metrics[split]["all"]["t2i"][f"r{k}"]
    # i2t: the fixture's captions repeat across images, so captions tie; ranks count strictly higher scores only
    model, tokenizer = load_for_embedding(root / "data/train/model.pt", torch.device("cpu"))
    image_ids, _, images = embed_gallery(model, root / "data/shards", "test", 16, torch.device("cpu"))
    caption_ids, caption_images, texts = embed_captions(model, tokenizer, root / "data/shards", "test", 16,
                                                        torch.device("cpu"))
    i2t = {r["query_id"]: r for r in pq.read_table(root / "data/evaluate/test.parquet").to_pylist()
           if r["direction"] == "i2t"}
    assert list(i2t) == image_ids
    for i, image_id in enumerate(image_ids):
        scores = (texts @ images[i]).tolist()
        best = max(s for s, owner in zip(scores, caption_images) if owner == image_id)
        assert i2t[image_id]["target_rank"] == 1 + sum(s > best for s in scores)
    manifest = json.loads((root / "data/index/index.json").read_text())
    declared = store.read_evaluation(root / "data/shards")["splits"]  # index.splits: auto
    assert manifest["task"] == "matching" and list(manifest["splits"]) == declared and "test" in declared
    assert pq.read_table(root / "data/index/test/captions.parquet").column("caption_id").to_pylist() == caption_ids
    assert torch.allclose(torch.from_numpy(np.load(root / "data/index/test/captions.npy")), texts, atol=1e-6)
