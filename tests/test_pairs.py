"""Training queries drawn per iteration as TIRG's CSS3D loader draws them (stages.shards.pairs)."""
import pytest
import torch

from stages.common.params import ParamsError
from stages.datasets import manifest
from stages.shards.loaders import decode_image
from stages.shards.pairs import PerIterationQueries, check_pair_sampling, per_iteration_batches
from test_loaders import data  # noqa: F401  (the module-scoped shard fixture)


def manifest_queries(root):
    _, queries = manifest.read(root / "resized")
    return {q["query_id"]: q for q in queries.to_pylist() if q["split"] == "train"}


def test_each_batch_is_two_edits_of_each_reference_from_the_manifest(data):  # noqa: F811
    by_id = manifest_queries(data)
    queries = PerIterationQueries(data / "shards", "train", 8, seed=0)
    for step in range(5):
        batch = queries[step]
        assert batch["ref"].shape == (8, 3, 24, 24)
        rows = [by_id[q] for q in batch["query_id"]]
        for row, query in enumerate(rows):  # a real train query, its text and its images
            assert batch["text"][row] == query["text"] and batch["target_id"][row] == query["target_id"]
        for first, second in zip(rows[0::2], rows[1::2]):  # pairs: one reference, two different texts
            assert first["reference_id"] == second["reference_id"] and first["text"] != second["text"]
    resized = data / "resized"
    images, _ = manifest.read(resized)
    path_of = dict(zip(images.column("image_id").to_pylist(), images.column("path").to_pylist()))
    first = by_id[queries[0]["query_id"][0]]
    assert torch.equal(queries[0]["ref"][0], decode_image((resized / path_of[first["reference_id"]]).read_bytes()))


def test_different_steps_draw_different_pairs_and_a_seed_draws_the_same_ones(data):  # noqa: F811
    a = PerIterationQueries(data / "shards", "train", 8, seed=0)
    b = PerIterationQueries(data / "shards", "train", 8, seed=0)
    other = PerIterationQueries(data / "shards", "train", 8, seed=1)
    draws = [a.draw(step) for step in range(20)]
    assert draws == [b.draw(step) for step in range(20)]
    assert len({tuple(d) for d in draws}) == 20  # every step its own batch
    assert draws != [other.draw(step) for step in range(20)]
    # over many steps the draw reaches most of the 48 queries, not a fixed subset
    assert len({i for d in draws for i in d}) > 36


def test_the_same_batches_whatever_the_workers_and_a_resume_continues_them(data):  # noqa: F811
    def ids(workers, start, steps):
        stream = per_iteration_batches(data / "shards", "train", 8, 0, workers, steps)
        if start:
            stream.load_state_dict({"step": start})
        return [b["query_id"] for b in stream]

    serial = ids(0, 0, 6)
    assert ids(2, 0, 6) == serial
    assert ids(0, 3, 6) == serial[3:]  # a run resumed at step 3 draws what the crashed one would have
    stream = per_iteration_batches(data / "shards", "train", 8, 0, 0, 6)
    for _ in range(4):
        next(stream)
    assert stream.state_dict() == {"step": 4}


def test_per_iteration_sampling_is_refused_for_matching():
    class Cfg:
        pair_sampling = "per_iteration"

    with pytest.raises(ParamsError, match="pretrain.pair_sampling"):
        check_pair_sampling(Cfg(), "matching", "pretrain")
    check_pair_sampling(Cfg(), "composed", "pretrain")
