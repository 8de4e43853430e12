"""dvc.yaml agrees with params.yaml and with the code: every knob of a stage's sections is a tracked param of that
stage, and every project file the stage executes is covered by its deps (so `dvc repro` never serves stale code)."""
from pathlib import Path

import yaml

from import_closure import closure, uncovered

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"prepare": ["dataset", "download"], "resize": ["resize"], "shard": ["shard"], "vocabulary": ["vocabulary"],
            "pretrain": ["task", "model", "loss", "pretrain", "ga"],
            "mine": ["task", "mine", "train.offline_negatives"], "train": ["task", "loss", "train", "ga"], "evaluate": ["task", "evaluate"],
            "index": ["index"]}
# keys of a stage's sections that the stage never reads: AOQ's loss terms belong to train (stages/training/aoq.py);
# not tracking them in pretrain lets DVC's run-cache give every AOQ variant of one seed the same pretrained model
NOT_READ = {"pretrain": {"loss.aoq_variant", "loss.aoq_margin_online", "loss.aoq_margin_offline", "loss.aoq_alpha",
                         "loss.aoq_beta"}}


def leaves(prefix, node):
    if isinstance(node, dict) and node:  # an empty mapping is one knob
        for key, value in node.items():
            yield from leaves(f"{prefix}.{key}", value)
    else:
        yield prefix


def test_each_stage_tracks_exactly_the_leaf_keys_of_its_sections():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(SECTIONS)
    for stage, sections in SECTIONS.items():
        expected = [key for section in sections
                    for key in (leaves(section, params[section]) if "." not in section else [section])
                    if key not in NOT_READ.get(stage, ())]
        assert stages[stage]["params"] == expected, stage
    tracked = {key for stage in stages.values() for key in stage["params"]}
    # orchestration: read by pipelines/; parallel: how prepare/resize/shard run, not what they output
    stage_sections = [section for section in params if section not in ("orchestration", "parallel")]
    assert tracked == {key for section in stage_sections for key in leaves(section, params[section])}


def test_each_stage_depends_on_its_own_module():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert f"python -m stages.{name} " in stage["cmd"]
        assert f"stages/{name}.py" in stage["deps"]


def test_each_stages_deps_cover_every_project_file_it_executes():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    problems = {name: uncovered(closure(f"stages.{name}"), stage["deps"]) for name, stage in stages.items()}
    assert not {name: files for name, files in problems.items() if files}, \
        "stage -> project files it executes that its deps do not cover"


def test_every_code_dep_exists():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for dep in stage["deps"]:
            if not dep.startswith("data/"):
                assert (REPO / dep).exists(), f"{name}: dep {dep} does not exist"


def test_a_removed_dep_is_named_with_its_stage():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = [d for d in stages["train"]["deps"] if d != "stages/retrieval"]
    missing = uncovered(closure("stages.train"), deps)
    # train reads the mined negatives through stages/retrieval/negatives.py, imported only by train.py
    assert "stages/retrieval/negatives.py" in missing and all(m.startswith("stages/retrieval/") for m in missing)


def test_the_closure_follows_function_level_imports_and_modules_loaded_by_name():
    files = {p.relative_to(REPO).as_posix() for p in closure("stages.prepare")}
    assert "stages/datasets/shapes.py" in files  # named in the ADAPTERS registry, imported with importlib
    assert "stages/datasets/coco.py" in files
    files = {p.relative_to(REPO).as_posix() for p in closure("stages.pretrain")}
    assert "stages/modeling/sentence_encoder.py" in files  # imported inside a function (MiniLM, on demand)
    assert "models/composed/val.py" in files  # through the model registry


def test_pretrain_reads_no_aoq_key_it_does_not_track():
    """NOT_READ holds: no file pretrain executes reads a `.aoq_*` field of the loss section (AOQ's batch loss,
    stages/training/aoq.py, is train's alone)."""
    import re

    readers = [path for path in closure("stages.pretrain")
               if re.search(r"\.aoq_(variant|margin_online|margin_offline|alpha|beta)\b", path.read_text())]
    assert not readers, f"pretrain executes code reading loss.aoq_*: track those keys in dvc.yaml ({readers})"
