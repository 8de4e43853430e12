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
from stages.datasets import evaluation, manifest
from stages.modeling.vocab import Vocab

SHAPES = dict(seed=3, image_size=32, min_objects=2, max_objects=4, train_queries=48, test_queries=16,
              novel_queries=16, novel_combos=4, queries_per_reference=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    images, queries = shapes.build(parse(shapes.Config, "dataset.shapes", SHAPES), root / "prepared")
    manifest.write(root / "prepared", images, queries)
    evaluation.write(root / "prepared", shapes.EVALUATION)  # as prepare writes it: task and texts auto read it
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


# --- decoding the batch on a device (JPEG shards): everything but the CUDA call runs here, on the CPU -----------

@pytest.fixture(scope="module")
def jpeg(data):
    """The shards of `data` with the images resized to JPEG."""
    run_resize(data / "prepared", data / "resized_jpeg", parse(ResizeConfig, "resize", dict(
        size=24, mode="center_crop", pad_value=0, format="jpeg", jpeg_quality=90)))
    run_shard(data / "resized_jpeg", data / "shards_jpeg", parse(ShardConfig, "shard", dict(maxcount=20, maxsize=10**8)))
    return data / "shards_jpeg"


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_decoded_on_a_device_equal_the_workers_decoding(jpeg, workers):
    """decode_on: the workers hand on the JPEG bytes and the batch is decoded at once by torchvision's decode_jpeg
    (here on the CPU: the same call as on CUDA but for its device); the batch equals PIL's decoding in the workers."""
    import itertools

    from stages.shards.loaders import matching_batches

    for batches in (training_batches, matching_batches):
        plain = list(itertools.islice(batches(jpeg, "train", 8, 16, seed=0, workers=workers), 3))
        on_device = list(itertools.islice(batches(jpeg, "train", 8, 16, seed=0, workers=workers,
                                                  decode_on=torch.device("cpu")), 3))
        for a, b in zip(plain, on_device):
            assert a.keys() == b.keys()
            for key, value in a.items():
                if isinstance(value, torch.Tensor):
                    assert b[key].shape == value.shape and torch.allclose(b[key], value, atol=1e-5), key
                else:
                    assert b[key] == value


def test_per_iteration_batches_decode_on_a_device_too(jpeg):
    from stages.shards.pairs import per_iteration_batches

    plain = next(per_iteration_batches(jpeg, "train", 6, seed=0, workers=0, steps=1))
    on_device = next(per_iteration_batches(jpeg, "train", 6, seed=0, workers=0, steps=1,
                                           decode_on=torch.device("cpu")))
    assert plain["query_id"] == on_device["query_id"]
    assert torch.allclose(plain["ref"], on_device["ref"], atol=1e-5) and on_device["tgt"].shape == (6, 3, 24, 24)


def test_decode_device_chooses_the_gpu_for_jpeg_shards_on_cuda_and_says_why_not_otherwise(data, jpeg, monkeypatch):
    """auto: the step's CUDA device for JPEG shards, else the workers (None); cuda asked for without a CUDA step,
    or on PNG shards, is an error naming the reason. No CUDA call is made: the device is only named."""
    from stages.common.errors import StageError
    from stages.shards.loaders import decode_device

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert decode_device("auto", cuda, jpeg, "train", "queries") == cuda
    assert decode_device("auto", cuda, jpeg, "train", "gallery") == cuda
    assert decode_device("cuda", cuda, jpeg, "train", "queries") == cuda
    assert decode_device("auto", cuda, data / "shards", "train", "queries") is None  # PNG
    assert decode_device("auto", cpu, jpeg, "train", "queries") is None
    assert decode_device("cpu", cuda, jpeg, "train", "queries") is None
    with pytest.raises(StageError, match="decodes JPEG only"):
        decode_device("cuda", cuda, data / "shards", "train", "queries")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(StageError, match="decode: cuda decodes the training images on the GPU, but torch sees no "
                                         "CUDA device"):
        decode_device("cuda", cpu, jpeg, "train", "queries")


def test_encoded_images_are_jpeg_only(data):
    from stages.common.errors import StageError
    from stages.shards.loaders import encoded_image

    with pytest.raises(StageError, match="JPEG only"):
        next(training_batches(data / "shards", "train", 8, 16, seed=0, workers=0, decode_on=torch.device("cpu")))
    with pytest.raises(StageError, match="JPEG only"):
        encoded_image(b"\x89PNG\r\n")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_stream_goes_on_with_the_uninterrupted_batches_across_epochs(data, workers, tmp_path):
    """The position saved after any batch (mid-epoch, at an epoch's end, in the next epoch) and restored into a new
    stream (through torch.save, as a checkpoint holds it) gives the batches the uninterrupted stream gives next."""
    def stream():
        return training_batches(data / "shards", "train", 8, 16, seed=0, workers=workers)

    whole = stream()
    expected = [next(whole) for _ in range(14)]  # 48 queries: 6 batches an epoch
    whole.close()
    for cut in (3, 6, 8):
        first = stream()
        for _ in range(cut):
            next(first)
        torch.save(first.state_dict(), tmp_path / "position.pt")
        first.close()
        resumed = stream()
        resumed.load_state_dict(torch.load(tmp_path / "position.pt", weights_only=True))
        for batch in expected[cut:]:
            got = next(resumed)
            assert got["query_id"] == batch["query_id"] and torch.equal(got["ref"], batch["ref"]), f"cut at {cut}"
        resumed.close()
