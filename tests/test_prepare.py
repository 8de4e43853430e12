"""Stage `prepare`: params.yaml -> <out>/images + manifests, complete or absent; bad params exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages.datasets import manifest
from stages import prepare
from stages.datasets.registry import ADAPTERS, load_adapter
from stages.common.params import ParamsError, parse

SHAPES = dict(
    seed=0,
    image_size=32,
    min_objects=2,
    max_objects=5,
    train_queries=60,
    test_queries=20,
    novel_queries=20,
    novel_combos=4,
    queries_per_reference=4,
)


def write_params(directory, dataset: dict) -> None:
    # Other sections are there to show that prepare reads only its own.
    download = {"workers": 2, "retries": 0, "backoff_seconds": 0.0, "timeout_seconds": 5.0}
    parallel = {"runner": "processes", "workers": 1, "address": None, "items_per_task": 64}
    params = {"dataset": dataset, "download": download, "parallel": parallel, "train": {"lr": "not read by prepare"}}
    (directory / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"name": "shapes", "shapes": SHAPES})
    return tmp_path


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial" in p.name)


def test_stage_writes_complete_output(workdir, capsys):
    prepare.main(["--out", "data/prepared"])
    out = workdir / "data" / "prepared"
    images, queries = manifest.read(out)
    assert queries.num_rows == 100
    assert all((out / path).is_file() for path in images.column("path").to_pylist())
    assert json.loads((out / "shapes.json").read_text())["queries"] == {"train": 60, "test": 20, "novel": 20}
    assert leftovers(workdir / "data") == []
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert line.startswith("prepare shapes: images novel=") and "queries novel=20 test=20 train=60" in line


def test_rerun_replaces_output_with_identical_content(workdir):
    prepare.main(["--out", "data/prepared"])
    first = {p.relative_to(workdir): p.read_bytes() for p in (workdir / "data").rglob("*") if p.is_file()}
    (workdir / "data" / "prepared" / "stray.txt").write_text("from an older run")
    prepare.main(["--out", "data/prepared"])
    second = {p.relative_to(workdir): p.read_bytes() for p in (workdir / "data").rglob("*") if p.is_file()}
    assert second == first


def test_failed_build_leaves_nothing(workdir):
    write_params(workdir, {"name": "shapes", "shapes": {**SHAPES, "min_objects": 1, "max_objects": 1,
                                                        "novel_combos": 23, "train_queries": 1000}})
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--out", "data/prepared"])
    assert exit_info.value.code == 2
    assert not (workdir / "data" / "prepared").exists() and leftovers(workdir / "data") == []


@pytest.mark.parametrize(
    "dataset, message",
    [
        ({"name": "imagenet", "shapes": SHAPES}, r"dataset\.name: unknown dataset 'imagenet'; known adapters: cirr, coco, css3d"),
        ({"name": 3, "shapes": SHAPES}, r"dataset\.name: expected the name of an adapter"),
        ({"shapes": SHAPES}, r"dataset\.name: expected the name of an adapter, got None"),
        ({"name": "shapes"}, r"dataset\.shapes: missing"),
        ({"name": "shapes", "shapes": SHAPES, "colour": 1}, r"dataset\.colour: unknown key"),
        ({"name": "shapes", "shapes": {**SHAPES, "sed": 1}}, r"dataset\.shapes\.sed: unknown key"),
        ({"name": "shapes", "shapes": {**SHAPES, "seed": "0"}}, r"dataset\.shapes\.seed: .*integer"),
        ({"name": "shapes", "shapes": {**SHAPES, "min_objects": 6}}, r"max_objects: must be in min_objects"),
    ],
)
def test_bad_params_exit_2_naming_the_key(workdir, capsys, dataset, message):
    write_params(workdir, dataset)
    with pytest.raises(ParamsError, match=message):
        prepare.prepare(workdir / "out")
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--out", "out"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: params.yaml: ") and len(err.strip().splitlines()) == 1
    assert not (workdir / "out").exists()


def test_missing_params_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match="params.yaml: not found"):
        prepare.prepare(tmp_path / "out")


def test_missing_out_argument_is_a_usage_error(workdir):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main([])
    assert exit_info.value.code == 2


def test_every_registered_adapter_has_config_and_build():
    for name in ADAPTERS:
        adapter = load_adapter(name)
        assert callable(adapter.build) and isinstance(adapter.Config, type)


def test_unknown_adapter_lists_the_known_ones():
    known = ", ".join(sorted(ADAPTERS))
    assert known == "cirr, coco, css3d, fashion200k, fashioniq, flickr30k, mitstates, shapes, shapes_captions, shoes"
    with pytest.raises(ParamsError, match=rf"dataset\.name: unknown dataset 'imagenet'; known adapters: {known}"):
        load_adapter("imagenet")


def test_every_registered_adapter_loads_and_parses_its_params_yaml_section():
    raw = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "params.yaml"))["dataset"]
    for name in ADAPTERS:
        adapter = load_adapter(name)
        assert callable(adapter.build)
        parse(adapter.Config, f"dataset.{name}", raw[name])
