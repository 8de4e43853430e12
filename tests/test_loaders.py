"""From shards to tensors: the training batches and the embeddings that mine/evaluate use."""
import pyarrow.parquet as pq
import pytest
import torch

from stages.datasets import shapes
from stages.retrieval.embedding import embed_gallery, embed_queries
from stages.shards.loaders import decode_image, training_batches
from stages.modeling.factory import ModelConfig, build_model
from tiny_repo import model_params
from stages.common.params import parse
from stages.resize import ResizeConfig, run_resize
from stages.shard import ShardConfig, run_shard
from stages.datasets import manifest
from stages.modeling.vocab import Vocab

SHAPES = dict(seed=3, image_size=32, min_objects=2, max_objects=4, train_queries=48, test_queries=16,
              novel_queries=16, novel_combos=4, queries_per_reference=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    images, queries = shapes.build(parse(shapes.Config, "dataset.shapes", SHAPES), root / "prepared")
    manifest.write(root / "prepared", images, queries)
    run_resize(root / "prepared", root / "resized", parse(ResizeConfig, "resize", dict(
        size=24, mode="center_crop", pad_value=0, format="png", jpeg_quality=90)))
    run_shard(root / "resized", root / "shards", parse(ShardConfig, "shard", dict(maxcount=20, maxsize=10**8)))
    return root


def test_training_batches_pair_each_text_with_its_own_images(data):
    images, queries = manifest.read(data / "resized")
    path_of = dict(zip(images.column("image_id").to_pylist(), images.column("path").to_pylist()))
    by_id = {q["query_id"]: q for q in queries.to_pylist()}
    batch = next(training_batches(data / "shards", "train", 8, 16, seed=0, workers=0))
    assert batch["ref"].shape == (8, 3, 24, 24) and batch["tgt"].shape == (8, 3, 24, 24)
    for row, query_id in enumerate(batch["query_id"]):
        query = by_id[query_id]
        assert query["split"] == "train" and batch["text"][row] == query["text"]
        assert batch["target_id"][row] == query["target_id"]
        reference = decode_image((data / "resized" / path_of[query["reference_id"]]).read_bytes())
        assert torch.equal(batch["ref"][row], reference)


def test_training_batches_are_reproducible_and_reshuffle_each_epoch(data):
    def first_epochs(seed):
        stream = training_batches(data / "shards", "train", 8, 16, seed=seed, workers=0)
        return [next(stream)["query_id"] for _ in range(12)]  # 48 queries = 6 batches an epoch

    a, b = first_epochs(0), first_epochs(0)
    assert a == b
    assert sorted(sum(a[:6], [])) == sorted(sum(a[6:], []))  # each epoch sees every query once
    assert a[:6] != a[6:]


def test_embeddings_follow_shard_order_and_are_normalised(data):
    model_cfg = parse(ModelConfig, "model", model_params(
        name="tirg", embed_dim=16, image={"encoder": "small_cnn", "weights": None, "channels": [8]},
        text={"embed_dim": 8, "hidden_dim": 8, "dropout": 0.0}))
    vocab = Vocab.build(["add a red circle"])
    model = build_model(model_cfg, len(vocab), 24).eval()
    ids, _, gallery = embed_gallery(model, data / "shards", "test", 5, torch.device("cpu"))
    images = pq.read_table(data / "resized" / "images.parquet").to_pylist()
    assert ids == [r["image_id"] for r in images if r["split"] == "test"]
    assert torch.allclose(gallery.norm(dim=1), torch.ones(len(ids)))
    records, features = embed_queries(model, vocab, data / "shards", "test", 5, torch.device("cpu"),
                                      ("composed", "image_only"))
    assert len(records) == 16 and features["composed"].shape == (16, 16)
    # image_only is the reference's own image feature: identical to that image's gallery row
    row = ids.index(records[0]["reference_id"])
    assert torch.allclose(features["image_only"][0], gallery[row], atol=1e-5)


def test_an_ensemble_ranks_by_the_mean_of_its_models_cosines(data):
    import yaml

    from stages.evaluate import EvaluateConfig, embed_split
    from tiny_repo import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = parse(EvaluateConfig, "evaluate", {**params["evaluate"], "batch_size": 7})
    vocab = Vocab.build(["add a red circle"])
    models = []
    for seed, name in ((0, "tirg"), (1, "amc")):
        torch.manual_seed(seed)
        model_cfg = parse(ModelConfig, "model", model_params(
            name=name, embed_dim=16, text={"embed_dim": 8, "hidden_dim": 8},
            image={"encoder": "small_cnn", "weights": None, "channels": [8, 8]}))
        models.append((build_model(model_cfg, len(vocab), 24).eval(), vocab))
    singles = [embed_split([m], data / "shards", "test", cfg, torch.device("cpu")) for m in models]
    ids, _, gallery, _, queries = embed_split(models, data / "shards", "test", cfg, torch.device("cpu"))
    assert ids == singles[0][0]
    mean_cosine = sum(s[4]["composed"] @ s[2].T for s in singles) / 2
    assert torch.allclose(queries["composed"] @ gallery.T, mean_cosine, atol=1e-5)
