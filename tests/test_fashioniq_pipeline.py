"""FashionIQ-format data through prepare -> resize -> shard -> vocabulary -> pretrain -> evaluate, the stages
unchanged, for each of the five composition models.

The annotation files are the real excerpts in ../shared/fixtures/fashioniq, served with generated
images by the local web server of test_fashioniq.py.
"""
import copy
import json

import pyarrow.parquet as pq
import pytest
import yaml

from stages import evaluate, pretrain, vocabulary
from stages.shards import store
from stages.common.params import parse
from stages.prepare import prepare
from stages.resize import ResizeConfig, run_resize
from stages.shard import ShardConfig, run_shard
from test_fashioniq import config, web  # noqa: F401  (web is a pytest fixture)
from tiny_repo import REPO

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
TINY_MODEL = {"embed_dim": 16, "image": {"encoder": "small_cnn", "weights": None, "channels": [8, 8, 8]},
              "text": {"encoder": "lstm", "embed_dim": 8, "hidden_dim": 8, "dropout": 0.0}}
ARMS = {"tirg": "bbc", "tirg_lastconv": "bbc", "composeae": "soft_triplet", "val": "val_matching", "amc": "amc"}


@pytest.fixture(scope="module")
def fashioniq_shards(web, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("fiq")
    fiq = dict(vars(config(web, root / "raw")))
    fiq["splits"] = ["train", "val"]
    params = copy.deepcopy(PARAMS)
    params["dataset"].update(name="fashioniq", fashioniq=fiq)
    params["download"].update(workers=4, retries=0, backoff_seconds=0.0, timeout_seconds=10.0)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        prepare(root / "prepared")
    run_resize(root / "prepared", root / "resized", parse(ResizeConfig, "resize", dict(
        size=32, mode="pad", pad_value=255, format="jpeg", jpeg_quality=90)))
    run_shard(root / "resized", root / "shards", parse(ShardConfig, "shard", dict(maxcount=25, maxsize=10**8)))
    store.verify(root / "shards")
    return root / "shards"


def write_params(folder, model_name: str, loss_name: str) -> None:
    params = copy.deepcopy(PARAMS)
    params["model"] = {**params["model"], **copy.deepcopy(TINY_MODEL), "name": model_name}
    params["loss"]["name"] = loss_name
    params["pretrain"].update(steps=3, batch_size=8, workers=0, log_every=1, checkpoint_every=2, shuffle_buffer=10,
                              device="cpu")
    params["evaluate"].update(splits=["val"], protocols=["fashioniq_val_union", "fashioniq_clip4cir"],
                              ks=[1, 5, 10], batch_size=32, device="cpu",
                              whm={"definition": "recall_levels", "beta": 1.0, "weights": [1.0, 1.0, 1.0]})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.parametrize("model_name", list(ARMS))
def test_each_model_trains_and_is_scored_on_fashioniq(fashioniq_shards, model_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, model_name, ARMS[model_name])
    print(vocabulary.vocabulary(fashioniq_shards, tmp_path / "vocab"))
    pretrain.main(["--shards", str(fashioniq_shards), "--vocab", "vocab", "--out", "pretrain",
                   "--metrics", "pretrain.json"])
    assert json.loads((tmp_path / "pretrain.json").read_text())["steps"] == 3
    evaluate.main(["--model", "pretrain/model.pt", "--shards", str(fashioniq_shards), "--out", "metrics.json"])

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    resized = fashioniq_shards.parent / "resized"
    queries = [q for q in pq.read_table(resized / "queries.parquet").to_pylist() if q["split"] == "val"]
    images = [i for i in pq.read_table(resized / "images.parquet").to_pylist() if i["split"] == "val"]
    for mode in ("composed", "image_only", "text_only"):
        union, full = (metrics[mode]["val"][p] for p in ("fashioniq_val_union", "fashioniq_clip4cir"))
        for category in ("dress", "shirt", "toptee"):
            asked = [q for q in queries if q["query_id"].startswith(f"{category}-")]
            query_images = {q[role] for q in asked for role in ("reference_id", "target_id")}
            assert union[category]["queries"] == full[category]["queries"] == len(asked)
            assert union[category]["gallery"] == len(query_images)
            assert full[category]["gallery"] == sum(i["caption"] == category for i in images)
            assert 0 <= union[category]["r10"] <= 100 and set(union["average"]) == {"r10"}
        assert union["mean"] == pytest.approx(sum(union[c]["r10"] for c in ("dress", "shirt", "toptee")) / 3, abs=0.01)
    assert "harmonic" not in metrics["composed"]  # one split, no flat protocol: nothing to combine
