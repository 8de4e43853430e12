"""The house rules of the layout: stages/ holds the stages and the user commands at its top level, no module
imports a stage module, and each kind of extension has one registry whose unknown names are params errors."""
from pathlib import Path

import pytest
import yaml

from import_closure import REPO, direct_imports
from models.losses import LOSSES
from models.registry import MODELS
from stages.common.params import ParamsError, parse
from stages.datasets.registry import ADAPTERS, load_adapter
from stages.modeling.factory import ModelConfig
from stages.training.objectives import LossConfig

COMMANDS = {"search", "export_css3d", "headline", "app"}  # user commands that are not DVC stages


def stage_names() -> set[str]:
    return set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def test_the_top_of_stages_is_the_stages_and_the_commands():
    modules = {p.stem for p in (REPO / "stages").glob("*.py")} - {"__init__"}
    assert modules == stage_names() | COMMANDS


def test_no_module_imports_a_stage_module():
    stage_files = {REPO / "stages" / f"{name}.py" for name in stage_names() | COMMANDS}
    offenders = []
    for path in sorted((REPO / "stages").rglob("*.py")) + sorted((REPO / "models").rglob("*.py")) \
            + sorted((REPO / "pipelines").rglob("*.py")):
        for imported in direct_imports(path) & stage_files:
            if imported != path:
                offenders.append(f"{path.relative_to(REPO)} imports {imported.relative_to(REPO)}")
    assert not offenders


def test_models_import_nothing_from_stages_or_pipelines():
    for path in (REPO / "models").rglob("*.py"):
        imported = {p.relative_to(REPO).parts[0] for p in direct_imports(path)}
        assert imported <= {"models"}, path


def model_section(name: str) -> dict:
    section = yaml.safe_load((REPO / "params.yaml").read_text())["model"]
    return {**section, "name": name}


def loss_section(name: str) -> dict:
    section = yaml.safe_load((REPO / "params.yaml").read_text())["loss"]
    return {**section, "name": name}


def test_an_unknown_model_name_is_a_params_error_listing_the_registered_models():
    with pytest.raises(ParamsError) as err:
        parse(ModelConfig, "model", model_section("tirgg"))
    message = str(err.value)
    assert "model.name" in message and all(f"'{name}'" in message for name in MODELS)


def test_an_unknown_loss_name_is_a_params_error_listing_the_registered_losses():
    with pytest.raises(ParamsError) as err:
        parse(LossConfig, "loss", loss_section("triplet"))
    message = str(err.value)
    assert "loss.name" in message and all(f"'{name}'" in message for name in LOSSES)


def test_an_unknown_dataset_is_a_params_error_listing_the_adapters():
    with pytest.raises(ParamsError) as err:
        load_adapter("imagenet")
    assert "dataset.name" in str(err.value) and all(name in str(err.value) for name in ADAPTERS)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_each_loss_trains_the_models_its_entry_says_and_refuses_the_others(loss):
    cfg = parse(LossConfig, "loss", loss_section(loss))
    entry = LOSSES[loss]
    for name, model in MODELS.items():
        fits = model.task == entry.task and entry.model in (None, name)
        if fits:
            cfg.check_model(name, 32, "train")
        else:
            with pytest.raises(ParamsError, match="loss.name"):
                cfg.check_model(name, 32, "train")


def test_every_registered_model_and_adapter_has_its_file():
    for name, adapter in ADAPTERS.items():
        assert (REPO / Path(*adapter.split("."))).with_suffix(".py").is_file(), name
    for name, entry in MODELS.items():
        assert Path(entry.build.__code__.co_filename).resolve().parent.parent == REPO / "models", name
