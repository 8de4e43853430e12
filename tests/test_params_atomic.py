import pytest
import yaml

from stages.common.atomic import atomic_path, partial_dir, staged_dir, write_json
from stages.evaluate import EvaluateConfig
from stages.common.params import ParamsError, load, parse
from stages.train import TrainConfig
from stages.training.loop import LoopConfig


def repo_params():
    with open("params.yaml") as f:
        return yaml.safe_load(f)


def test_every_section_of_the_repository_params_parses():
    raw = repo_params()
    parse(LoopConfig, "pretrain", raw["pretrain"])
    parse(TrainConfig, "train", raw["train"])
    parse(EvaluateConfig, "evaluate", raw["evaluate"])


@pytest.mark.parametrize(
    "change,message",
    [
        ({"lr": -0.1}, r"train\.lr: Input should be greater than 0"),
        ({"lr": "0.1"}, r"train\.lr: Input should be a valid number"),
        ({"steps": 10.5}, r"train\.steps: Input should be a valid integer"),
        ({"offline_negatives": "yes"}, r"train\.offline_negatives: Input should be a valid boolean"),
        ({"optimizer": "rmsprop"}, r"train\.optimizer: Input should be 'sgd', 'adam' or 'adam_two_towers'"),
        ({"learning_rate": 0.1}, r"train\.learning_rate: unknown key"),
        ({"ema_as_released_every": 5}, r"train\.ema_as_released_every: needs ema_decay > 0"),
    ],
)
def test_bad_train_params_name_the_key(change, message):
    raw = {**repo_params()["train"], **change}
    with pytest.raises(ParamsError, match=message):
        parse(TrainConfig, "train", raw)


def test_missing_key_and_section_are_named(tmp_path):
    raw = repo_params()["evaluate"]
    raw.pop("ks")
    with pytest.raises(ParamsError, match="evaluate.*ks"):
        parse(EvaluateConfig, "evaluate", raw)
    (tmp_path / "p.yaml").write_text("train: {}\n")
    with pytest.raises(ParamsError, match="missing section 'evaluate'"):
        load(EvaluateConfig, "evaluate", tmp_path / "p.yaml")
    with pytest.raises(ParamsError, match="evaluate.ks: must be increasing"):
        parse(EvaluateConfig, "evaluate", {**repo_params()["evaluate"], "ks": [10, 1]})
    raw = repo_params()["evaluate"]
    with pytest.raises(ParamsError, match="evaluate.whm.weights: needs one weight per evaluate.ks"):
        parse(EvaluateConfig, "evaluate", {**raw, "ks": [1, 10], "whm": {**raw["whm"], "weights": [1.0, 1.0, 1.0]}})
    with pytest.raises(ParamsError, match="evaluate.whm.definition: 'splits' compares exactly two splits"):
        parse(EvaluateConfig, "evaluate", {**raw, "splits": ["test"], "whm": {**raw["whm"], "definition": "splits"}})
    with pytest.raises(ParamsError, match=r"evaluate\.whm\.definition: Input should be 'auto', 'splits' or 'recall_levels'"):
        raw = repo_params()["evaluate"]
        parse(EvaluateConfig, "evaluate", {**raw, "whm": {**raw["whm"], "definition": "f1"}})


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert target.read_text().strip() == '{\n  "a": 1\n}'


def test_staged_dir_appears_only_when_complete_and_resumes(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(out, resume_key="k1") as work:
            (work / "done.txt").write_text("kept")
            raise RuntimeError("crash")
    assert not out.exists()
    assert (partial_dir(out, "k1") / "done.txt").read_text() == "kept"
    with staged_dir(out, resume_key="k1") as work:
        assert (work / "done.txt").exists()  # the crashed run's work is there to resume
    assert (out / "done.txt").exists() and not partial_dir(out, "k1").exists()
    with pytest.raises(RuntimeError):
        with staged_dir(out) as work:
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_floats_written_the_way_dvc_exp_run_writes_them_are_numbers(tmp_path):
    # `dvc exp run -S train.weight_decay=1e-6` writes `1e-06`, which plain PyYAML reads as a string
    from stages.common.params import read_yaml

    (tmp_path / "params.yaml").write_text("a: 1e-06\nb: 1.0e-6\nc: -2E+3\nd: 12\ne: 1e5x\nf: .5\n")
    assert read_yaml(tmp_path / "params.yaml") == {"a": 1e-06, "b": 1e-06, "c": -2000.0, "d": 12, "e": "1e5x", "f": 0.5}
