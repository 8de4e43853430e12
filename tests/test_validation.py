"""stages.common.validation: each stage checks the params of the cirflow stages after it, and only those."""
import shutil
from pathlib import Path

import pytest
import yaml

from stages.common.params import ParamsError
from stages.common.validation import check_from, stage_order
from stages.datasets.shapes import EVALUATION as SHAPES_EVALUATION

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path):
    """The repository's dvc.yaml with a user's own stage after evaluate, beside a copy of params.yaml."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc_yaml["stages"]["plots"] = {"cmd": "python scripts/plots.py metrics/evaluate.json", "deps": ["metrics"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_stage_order_names_the_module_each_cmd_runs_and_none_for_a_users_stage(project):
    order = stage_order(project / "params.yaml")
    assert order[0] == ("prepare", "prepare") and ("evaluate", "evaluate") in order
    assert order[-1] == ("plots", None)


def test_a_users_own_stage_is_not_imported_but_a_bad_later_key_still_stops_the_first_stage(project):
    params = project / "params.yaml"
    declared = SHAPES_EVALUATION.as_json()  # what prepare hands on: the dataset's declaration
    check_from("prepare", params, declared)  # a stage that runs no `python -m stages.X` is not cirflow's to check
    values = yaml.safe_load(params.read_text())
    values["evaluate"]["ks"] = [10, 1]
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    with pytest.raises(ParamsError, match="evaluate.ks"):
        check_from("prepare", params, declared)


def test_train_can_train_with_its_own_loss(project):
    """train.loss_name: the pretrained model goes on with another loss (VSE++ after an InfoNCE pretrain); same keeps
    loss.name, and a loss that cannot train the model is refused by name."""
    from stages import train
    from stages.datasets.shapes_captions import EVALUATION as CAPTIONS_EVALUATION

    params = project / "params.yaml"
    matching = CAPTIONS_EVALUATION.as_json()
    assert train.check_params(params, matching)[1].name == "info_nce"  # loss.name auto, task matching
    values = yaml.safe_load(params.read_text())
    values["train"]["loss_name"] = "vse"
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    task, loss = train.check_params(params, matching)
    assert (task, loss.name) == ("matching", "vse")
    with pytest.raises(ParamsError, match="loss.name: 'vse' trains image-text matching models, model.name is 'tirg'"):
        train.check_params(params, SHAPES_EVALUATION.as_json())
