"""Released recipes (pipelines/recipes/*.yaml): each loads, validates against params.yaml, keeps cirflow's own
offline negatives off, and one runs end to end through `dvc exp run` with its -S flags."""
import json
import sys

import pytest
import yaml

from pipelines import recipes
from pipelines.repro import flatten
from stages.common.params import parse
from stages.datasets.registry import load_adapter
from stages.modeling.factory import ModelConfig
from stages.train import TrainConfig
from stages.training.loop import LoopConfig
from stages.training.objectives import GAConfig, LossConfig, check_ga_task
from tiny_repo import REPO, make_tiny_repo, run

EXPECTED = {"tirg", "tirg_lastconv", "tirg_lastconv_ga", "composeae", "composeae_ga", "val", "amc"}
MATCHING = {"info_nce", "de_nce", "de_nce_siam", "vse", "vse_aoq_offtri", "vse_aoq_offquin", "vse_aoq_adapoffquin"}
VSE_FAMILY = {"vse", "vse_aoq_offtri", "vse_aoq_offquin", "vse_aoq_adapoffquin"}


def with_recipe(name: str) -> dict:
    """params.yaml with the recipe's values set, as `dvc exp run -S` would leave it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in recipes.load(name, REPO / "params.yaml")[1].items():
        *path, leaf = key.split(".")
        node = params
        for part in path:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return params


def checked(name: str):
    """(params, model, pretrain, train, ga) of a recipe, each section parsed and checked as the stages do."""
    params = with_recipe(name)
    model = parse(ModelConfig, "model", params["model"])
    loss = parse(LossConfig, "loss", params["loss"])
    pretrain = parse(LoopConfig, "pretrain", params["pretrain"])
    train = parse(TrainConfig, "train", params["train"])
    ga = parse(GAConfig, "ga", params["ga"])
    declared = load_adapter(params["dataset"]["name"]).EVALUATION.as_json()  # what prepare hands on
    task = declared["task"] if params["task"] == "auto" else params["task"]
    assert task == declared["task"], f"{name}: task {task} on a {declared['task']} dataset"
    model, loss = model.for_task(task), loss.for_task(task)
    loss.check_model(model.name, pretrain.batch_size, "pretrain")
    check_ga_task(ga, task)
    return params, model, pretrain, train, ga


def test_every_method_has_its_recipe():
    assert set(recipes.names()) == EXPECTED | MATCHING


@pytest.mark.parametrize("name", sorted(MATCHING))
def test_each_matching_recipe_is_valid_and_spends_the_same_budget(name):
    params, model, pretrain, train, _ = checked(name)
    assert params["dataset"]["name"] == "shapes_captions" and model.name == "dual_encoder"
    assert train.offline_negatives == name.startswith("vse_aoq")
    assert (train.siam_steps > 0) == name.endswith("siam")
    # the matching track's budget: every arm pretrains the same steps of the same batch; the arms a claim compares
    # spend the same in train too (SIAM - DE: one DE; AOQ - VSE++: one warm start, then the same train steps)
    assert {(with_recipe(n)["pretrain"]["steps"], with_recipe(n)["pretrain"]["batch_size"]) for n in MATCHING} \
        == {(1000, 128)}
    assert len({yaml.safe_dump(with_recipe(n)["train"]["steps"]) for n in VSE_FAMILY}) == 1
    if name.startswith("de_nce"):
        assert (pretrain.optimizer, pretrain.lr_schedule, pretrain.clip_grad_norm) == ("adam_two_towers", "cosine_per_pass", 30.0)
        assert train.steps == 0
    elif name in VSE_FAMILY:
        warm_start = with_recipe("info_nce")["pretrain"]
        assert with_recipe(name)["pretrain"] == warm_start and with_recipe(name)["loss"]["name"] == "info_nce"
        assert (train.loss_name, train.clip_grad_norm, train.selection, train.steps) == ("vse", 2.0, "val_r1_r5", 300)
    else:
        assert (name, train.steps, train.offline_negatives) == ("info_nce", 0, False)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_recipe_is_a_valid_configuration_without_offline_negatives(name):
    params, model, pretrain, train, ga = checked(name)
    assert not train.offline_negatives and train.steps == 0 and pretrain.steps > 0
    assert model.name == name.removesuffix("_ga")
    assert (ga.adversarial and ga.isotropic) == name.endswith("_ga")


def test_set_overrides_win_over_the_recipe():
    out = recipes.overrides("tirg", ["pretrain.batch_size=16"], REPO / "params.yaml")
    assert out[-1] == "pretrain.batch_size=16" and "pretrain.batch_size=32" in out


def test_an_unknown_recipe_or_key_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="recipe 'tirgg'.*recipes: amc"):
        recipes.load("tirgg", REPO / "params.yaml")
    (tmp_path / "bad.yaml").write_text("description: x\nparams:\n  pretrain.learning_rate: 0.1\n")
    monkeypatch.setattr(recipes, "RECIPES", tmp_path)
    with pytest.raises(ValueError, match="'pretrain.learning_rate' is not a key of"):
        recipes.load("bad", REPO / "params.yaml")


def test_the_ga_recipe_runs_end_to_end_with_its_dvc_flags(tmp_path):
    repo = make_tiny_repo(tmp_path / "repo")
    _, params = recipes.load("tirg_lastconv_ga", repo / "params.yaml")
    tiny = {"pretrain.steps": "4", "pretrain.batch_size": "8", "model.embed_dim": "32", "model.text.embed_dim": "16",
            "model.text.hidden_dim": "16"}
    flags = [arg for key, value in {**params, **tiny}.items() for arg in ("-S", f"{key}={value}")]
    result = run([sys.executable, "-m", "dvc", "exp", "run", *flags], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo).stdout)
    assert shown, "dvc exp show lists the experiment"
    train = json.loads((repo / "metrics" / "train.json").read_text())
    assert train["steps"] == 0  # the pretrained weights are the model, as the release trains once
    metrics = flatten(json.loads((repo / "metrics" / "evaluate.json").read_text()))
    assert metrics["composed.test.target.gallery"] > 0 and 0 <= metrics["composed.test.target.r1"] <= 100
    log = (repo / "data" / "live" / "pretrain" / "plots" / "metrics" / "ga_adversarial.tsv").read_text()
    assert len(log.splitlines()) > 1  # the adversarial term was on


def test_a_grid_option_names_a_recipe_and_overrides_it():
    from pathlib import Path

    from pipelines.sweep import combinations, parse_grid

    grid = parse_grid(None, Path(REPO / "pipelines" / "grids" / "shapes_recipes.yaml"))
    points = {(labels["arm"], labels["seed"]): params for labels, params in combinations(grid)}
    assert len(points) == 45  # 9 arms x 5 seeds (the offline-negatives arm follows on the best one)
    adversarial = points[("tirg_lastconv_adversarial", "s1")]
    _, recipe = recipes.load("tirg_lastconv_ga", REPO / "params.yaml")
    assert adversarial["loss.ga_mse_weight"] == recipe["loss.ga_mse_weight"]  # from the recipe
    assert adversarial["ga.isotropic"] == "false" and adversarial["ga.adversarial"] == "true"  # the option wins
    assert adversarial["pretrain.seed"] == "1" and adversarial["pretrain.steps"] == "260"
