"""evaluate's `auto` params: each dataset's declared splits, protocols, ks and WHM reading, explicit values winning."""
import pytest
import yaml

from stages.common.errors import StageError
from stages.common.params import parse
from stages.datasets import registry
from stages.datasets.evaluation import Evaluation
from stages.evaluate import EvaluateConfig, resolve
from tiny_repo import REPO

CSS3D = Evaluation(splits=("test",), protocols=("caption",), ks=(1, 5, 10, 50)).as_json()
SHAPES = Evaluation(splits=("test", "novel"), protocols=("target",), ks=(1, 10, 50), whm_definition="splits").as_json()


def evaluate_params(**changes):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]
    whm = {**raw["whm"], **changes.pop("whm", {})}
    return parse(EvaluateConfig, "evaluate", {**raw, **changes, "whm": whm})


def test_auto_reads_the_declaration_and_explicit_values_win():
    cfg = resolve(evaluate_params(), CSS3D, "data/shards")
    assert (cfg.splits, cfg.protocols, cfg.ks) == (["test"], ["caption"], [1, 5, 10, 50])
    assert (cfg.whm.definition, cfg.whm.weights) == ("recall_levels", [1.0, 1.0, 1.0, 1.0])
    cfg = resolve(evaluate_params(), SHAPES, "data/shards")
    assert (cfg.splits, cfg.ks, cfg.whm.definition) == (["test", "novel"], [1, 10, 50], "splits")
    cfg = resolve(evaluate_params(splits=["test"], ks=[1, 5]), SHAPES, "data/shards")
    # one split: the declared 'splits' reading cannot apply; weights follow the explicit ks
    assert (cfg.splits, cfg.ks, cfg.protocols, cfg.whm.definition, cfg.whm.weights) == (
        ["test"], [1, 5], ["target"], "recall_levels", [1.0, 1.0])


def test_auto_without_a_declaration_names_the_shards_and_the_key():
    with pytest.raises(StageError, match=r"data/shards: evaluate.splits: auto reads the dataset's evaluation.json"):
        resolve(evaluate_params(), None, "data/shards")
    explicit = evaluate_params(splits=["test"], protocols=["target"], ks=[1, 10],
                               whm={"definition": "recall_levels", "weights": [1.0, 1.0]})
    assert resolve(explicit, None, "data/shards") is explicit  # nothing to read


def test_every_adapter_declares_how_it_is_evaluated():
    for name in registry.ADAPTERS:
        declared = registry.load_adapter(name).EVALUATION
        assert isinstance(declared, Evaluation) and declared.splits, name
        assert declared.whm_definition != "splits" or len(declared.splits) == 2, name
