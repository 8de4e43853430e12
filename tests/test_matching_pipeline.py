"""task: matching through the real `dvc repro` on the COCO-shaped shapes captions (5 per image, 1K-style folds on
test): a dual encoder pretrained with one loss, AOQ candidates mined in both directions, fine-tuned with the AOQ
loss, scored i2t (best of 5) / t2i over the whole split and averaged over the folds."""
import json

import pytest
import yaml

from tiny_repo import make_tiny_repo, merge, run

MATCHING = {  # task, vocabulary.texts and model.name stay auto: the dataset declares image-text matching
    "dataset": {"name": "shapes_captions", "shapes_captions": {"image_size": 40, "train_images": 120, "val_images": 20,
                                                               "test_images": 40, "novel_images": 20, "folds": 2}},
    "loss": {"name": "vse"},
    "mine": {"aoq_i2t_k": 20, "aoq_t2i_k": 10},
    # pretrain keeps its best validated weights (AOQ's rule), train steps the towers as the DE release does
    "pretrain": {"selection": "val_r1_r5", "eval_every": 5, "clip_grad_norm": 2.0},
    "train": {"aoq_candidate_range": 5, "siam_steps": 3, "optimizer": "adam_two_towers", "text_lr": 1e-4,
              "lr_schedule": "cosine_per_pass", "clip_grad_norm": 30.0},
}


def switch_to_matching(repo, **loss) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in MATCHING.items():
        params[section] = merge(params[section], values) if isinstance(values, dict) else values
    params["loss"].update(loss)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def matching_repo(tmp_path_factory):
    repo = make_tiny_repo(tmp_path_factory.mktemp("matching"))
    switch_to_matching(repo)
    return repo, run(["dvc", "repro"], repo)


def test_matching_runs_every_stage_and_scores_both_directions(matching_repo):
    repo, result = matching_repo
    assert "AOQ candidates" in result.stdout and "AOQ adaptive_quintuplet" in result.stdout
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    for split in ("test", "novel"):
        scores = metrics[split]["all"]
        for direction in ("i2t", "t2i"):
            assert set(scores[direction]) == {"r1", "r5", "r10", "medr", "meanr"}
            assert 0 <= scores[direction]["r1"] <= scores[direction]["r5"] <= scores[direction]["r10"] <= 100
        assert scores["rsum"] == pytest.approx(sum(scores[d][f"r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)),
                                               abs=0.05)
        assert 5 * metrics[split]["counts"]["images"] == metrics[split]["counts"]["captions"]
        reranked = metrics[split]["siam_reranked"]["t2i"]
        assert set(reranked) == {"r1", "r5", "r10"} and reranked["r10"] <= 100
    folds = metrics["test"]["folds_average"]  # the 1K-style protocol: 2 folds of 20 test images here
    assert set(folds) == {"i2t", "t2i", "rsum"} and "folds_average" not in metrics["novel"]
    assert metrics["test"]["counts"]["images"] == 40
    assert "SIAM 3 steps" in result.stdout and (repo / "data/train/siam.pt").is_file()
    pretrain = json.loads((repo / "metrics/pretrain.json").read_text())
    assert pretrain["selected_step"] in (5, 10, 12) and 0 <= pretrain["selected_val_r1_r5"] <= 400
    scores = (repo / "data/live/pretrain/plots/metrics/val_r1_r5.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in scores[1:]] == ["5", "10", "12"]
    assert max(float(line.split("\t")[1]) for line in scores[1:]) == pretrain["selected_val_r1_r5"]
    vocab = json.loads((repo / "data/vocab/vocab.json").read_text())
    index = json.loads((repo / "data/shards/index.json").read_text())
    train_images, train_queries = (index["splits"]["train"][kind]["count"] for kind in ("gallery", "queries"))
    assert (train_images, train_queries) == (120, 0)
    assert vocab["texts"] == 5 * train_images  # built from every caption of every train image


def test_a_composed_model_is_refused_for_matching(matching_repo):
    repo, _ = matching_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["name"] = "tirg"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "stages.pretrain", "--shards", "data/shards", "--vocab", "data/vocab",
                             "--out", "data/pretrain"], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 2
    assert "model.name: 'tirg' is a composed retrieval model, task is 'matching'" in result.stderr
    params["task"], params["loss"]["name"], params["pretrain"]["selection"] = "composed", "bbc", "val_rsum"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "stages.pretrain", "--shards", "data/shards", "--vocab", "data/vocab",
                             "--out", "data/pretrain"], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 2
    assert ("pretrain.selection: val_rsum is not a composed validation metric; use last or one of val_r1, val_r5, "
            "val_r10, val_r50, val_r10_r50") in result.stderr
