"""dvc.yaml and params.yaml agree: every knob of a stage's sections is a tracked param of that stage."""
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"prepare": ["dataset", "download"], "resize": ["resize"], "shard": ["shard"], "vocabulary": ["vocabulary"],
            "pretrain": ["task", "model", "loss", "pretrain", "ga"],
            "mine": ["task", "mine"], "train": ["task", "loss", "train", "ga"], "evaluate": ["task", "evaluate"]}


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
        expected = [key for section in sections for key in leaves(section, params[section])]
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
