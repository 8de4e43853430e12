"""stages.training.selection: which split training validates on, which metrics it can select by, and the errors
that name the key when a choice cannot work."""
import json

import pytest

from stages.common.params import ParamsError, parse
from stages.shards.store import INDEX_FILE, INDEX_FORMAT
from stages.training.loop import LoopConfig
from stages.training.selection import check_selection, composed_names, validation_split, validator
from test_training import LOOP

SHAPES = {"task": "composed", "splits": ["test", "novel"], "protocols": ["target"], "ks": [1, 5, 10, 50],
          "validation": "val"}
CSS3D = {**SHAPES, "splits": ["test"], "protocols": ["caption"], "validation": None}


def shards(tmp_path, splits: dict[str, int]):
    """An index.json with these splits (gallery counts): all that the checks read."""
    index = {"format": INDEX_FORMAT, "splits": {
        split: {"gallery": {"count": count, "shards": []}, "queries": {"count": count, "shards": []}}
        for split, count in splits.items()}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    return tmp_path


def loop(**changes) -> LoopConfig:
    return parse(LoopConfig, "pretrain", {**LOOP, **changes})


def test_auto_is_the_declared_split_and_a_named_one_must_be_in_the_shards(tmp_path):
    where = shards(tmp_path, {"train": 100, "val": 60, "test": 60})
    assert validation_split(loop(), SHAPES, where, "pretrain") == "val"
    assert validation_split(loop(validation_split="test"), CSS3D, where, "pretrain") == "test"
    with pytest.raises(ParamsError, match="pretrain.validation_split: .* has no split 'dev'"):
        validation_split(loop(validation_split="dev"), SHAPES, where, "pretrain")


def test_no_declared_split_means_no_validation_unless_a_selection_needs_one(tmp_path, capsys):
    where = shards(tmp_path, {"train": 100, "test": 60})
    assert validator(loop(eval_every=2), "composed", "pretrain", None, where, "cpu", CSS3D) is None
    assert "no validation recall: the shards hold no validation split the dataset declares" in capsys.readouterr().out
    built_without = shards(tmp_path, {"train": 100, "test": 60})  # shapes with val_queries 0: val declared, not built
    assert validator(loop(eval_every=2), "composed", "pretrain", None, built_without, "cpu", SHAPES) is None
    with pytest.raises(ParamsError, match="has no split 'val' \\(dataset.shapes.val_queries is 0\\?\\)"):
        validator(loop(eval_every=2, selection="val_r1"), "composed", "pretrain", None, built_without, "cpu", SHAPES)
    with pytest.raises(ParamsError, match="pretrain.validation_split: auto, but the dataset declares no validation "
                                          "split for selection val_r10"):
        validator(loop(eval_every=2, selection="val_r10"), "composed", "pretrain", None, where, "cpu", CSS3D)


def test_a_selection_must_be_a_metric_the_task_and_the_gallery_report(tmp_path):
    with pytest.raises(ParamsError, match="train.selection: val_rsum is not a composed validation metric"):
        check_selection("val_rsum", "composed", "train")
    with pytest.raises(ParamsError, match="train.selection: val_r10 is not a matching validation metric"):
        check_selection("val_r10", "matching", "train")
    assert composed_names([1, 5, 10, 50]) == ("val_r1", "val_r5", "val_r10", "val_r50", "val_r10_r50")
    assert composed_names([1, 10]) == ("val_r1", "val_r10")
    where = shards(tmp_path, {"train": 100, "val": 30})  # a 30-image gallery: R@50 cannot be measured
    with pytest.raises(ParamsError, match="pretrain.selection: val_r10_r50 needs recall at r10 and r50"):
        validator(loop(eval_every=2, selection="val_r10_r50"), "composed", "pretrain", None, where, "cpu", SHAPES)
    with pytest.raises(ParamsError, match="selection: val_r1 keeps the best validated weights: set eval_every > 0"):
        loop(eval_every=0, selection="val_r1")
