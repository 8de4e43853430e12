"""FashionIQ-format data through prepare -> resize -> shard -> evaluate, the stages unchanged.

The annotation files are the real excerpts in ../shared/fixtures/fashioniq, served with generated
images by the local web server of test_fashioniq.py.
"""
import json

import pyarrow.parquet as pq
import torch
import yaml

from stages import evaluate, shards
from stages.modeling import ModelConfig, build_model, save_model
from stages.params import parse
from stages.prepare import prepare
from stages.resize import ResizeConfig, run_resize
from stages.shard import ShardConfig, run_shard
from stages.vocab import Vocab
from test_fashioniq import DOWNLOAD, config, web  # noqa: F401  (web is a pytest fixture)

MODEL = {"name": "tirg", "embed_dim": 16, "norm_scale": 4.0,
         "image": {"encoder": "small_cnn", "weights": None, "channels": [8]},
         "text": {"embed_dim": 8, "hidden_dim": 8, "dropout": 0.0}}


def test_fashioniq_runs_through_resize_shard_and_evaluate(web, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    fiq = {k: v for k, v in vars(config(web, tmp_path / "raw")).items()}
    fiq["splits"] = ["train", "val"]
    params = {
        "dataset": {"name": "fashioniq", "fashioniq": fiq},
        "download": {"workers": 4, "retries": 0, "backoff_seconds": 0.0, "timeout_seconds": 10.0},
        "evaluate": {"splits": ["val"], "ks": [1, 5, 10], "batch_size": 32, "device": "cpu",
                     "whm": {"definition": "recall_levels", "beta": 1.0, "weights": [1.0, 1.0, 1.0]}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    print(prepare(tmp_path / "prepared"))
    run_resize(tmp_path / "prepared", tmp_path / "resized", parse(ResizeConfig, "resize", dict(
        size=16, mode="pad", pad_value=255, format="jpeg", jpeg_quality=90, workers=1)))
    run_shard(tmp_path / "resized", tmp_path / "shards", parse(ShardConfig, "shard", dict(maxcount=25, maxsize=10**8)))
    shards.verify(tmp_path / "shards")

    queries = pq.read_table(tmp_path / "resized" / "queries.parquet").to_pylist()
    images = pq.read_table(tmp_path / "resized" / "images.parquet").to_pylist()
    val_queries = [q for q in queries if q["split"] == "val"]
    val_images = [i for i in images if i["split"] == "val"]
    assert val_queries and len(val_images) > 10
    assert all(q["query_id"].split("-")[1] == "val" for q in val_queries)

    torch.manual_seed(0)
    vocab = Vocab.build(q["text"] for q in queries if q["split"] == "train")
    model = build_model(parse(ModelConfig, "model", MODEL), len(vocab), 16)
    save_model(tmp_path / "model.pt", model, parse(ModelConfig, "model", MODEL), vocab.state_dict(), 16)
    evaluate.main(["--model", "model.pt", "--shards", "shards", "--out", "metrics.json"])

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["counts"]["val"] == {"queries": len(val_queries), "gallery": len(val_images)}
    for name in ("tirg", "image_only", "text_only"):
        recalls = metrics[name]["val"]
        assert set(recalls) == {"r1", "r5", "r10"} and recalls["r1"] <= recalls["r5"] <= recalls["r10"] <= 100
        assert 0 <= metrics[name]["whm"]["val"] <= recalls["r10"]
