"""The `index` stage: the final model's gallery features of each evaluation split, tied to the model file."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from stages import index as index_stage
from stages.common.errors import StageError
from stages.common.params import ParamsError
from stages.retrieval import feature_index
from stages.retrieval.embedding import embed_gallery, load_for_embedding
from stages.shards import store

CPU = torch.device("cpu")


def test_the_index_holds_the_models_unit_gallery_vectors_in_shard_order(tiny_composed):
    manifest = json.loads((tiny_composed.index / "index.json").read_text())
    model, _ = load_for_embedding(tiny_composed.model, CPU)
    image_ids, captions, gallery = embed_gallery(model, tiny_composed.shards, "test", 16, CPU)
    assert manifest == {"format": 1, "model": str(tiny_composed.model), "model_sha256": store.file_sha256(
        tiny_composed.model), "model_name": "tirg", "task": "composed", "dim": gallery.shape[1],
        "splits": {"test": {"gallery": len(image_ids)}}}
    assert sorted(p.name for p in (tiny_composed.index / "test").iterdir()) == ["gallery.npy", "gallery.parquet"]
    features = np.load(tiny_composed.index / "test" / "gallery.npy")
    assert features.dtype == np.float32 and np.allclose(features, gallery.numpy(), atol=1e-6)
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    table = pq.read_table(tiny_composed.index / "test" / "gallery.parquet")
    assert table.column_names == ["image_id", "caption"]
    assert table.column("image_id").to_pylist() == image_ids and table.column("caption").to_pylist() == captions
    split = feature_index.load_split(tiny_composed.index, manifest, "test")
    assert split.image_ids == image_ids and torch.equal(split.gallery, torch.from_numpy(features))
    assert split.rows[image_ids[3]] == 3 and split.caption_features is None


def test_another_model_file_is_refused(tiny_composed, tmp_path):
    other = tmp_path / "model.pt"
    shutil.copy(tiny_composed.model, other)
    feature_index.open_index(tiny_composed.index, other)  # the same bytes: the same model
    with other.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(StageError, match=r"index built from another model: re-run `dvc repro index`"):
        feature_index.open_index(tiny_composed.index, other)


def test_a_missing_index_or_split_is_named(tiny_composed, tmp_path):
    with pytest.raises(StageError, match=r"index.json: no feature index there \(build it with `dvc repro index`"):
        feature_index.open_index(tmp_path, tiny_composed.model)
    manifest = feature_index.open_index(tiny_composed.index, tiny_composed.model)
    with pytest.raises(StageError, match=r"no split 'novel' in the index \(it has test\)"):
        feature_index.load_split(tiny_composed.index, manifest, "novel")


def test_the_stage_indexes_the_declared_splits_or_the_listed_ones(tiny_composed, tmp_path, capsys):
    args = ["--params", str(tiny_composed.params), "--model", str(tiny_composed.model), "--shards",
            str(tiny_composed.shards)]
    index_stage.main([*args, "--out", str(tmp_path / "auto")])
    assert set(json.loads((tmp_path / "auto/index.json").read_text())["splits"]) == {"test", "novel"}
    assert "index: composed model tirg" in capsys.readouterr().out

    params = yaml.safe_load(tiny_composed.params.read_text())
    params["index"]["splits"] = ["novel"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args[1] = str(tmp_path / "params.yaml")
    index_stage.main([*args, "--out", str(tmp_path / "listed")])
    assert set(json.loads((tmp_path / "listed/index.json").read_text())["splits"]) == {"novel"}
    assert not list(tmp_path.glob(".listed.partial-*"))

    params["index"]["batch_size"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="index.batch_size"):
        index_stage.check_params(tmp_path / "params.yaml")
