"""`python -m stages.headline`: the short table `make repro` ends with, from hand-written metrics files."""
import json
import subprocess
import sys

from stages.headline import headline

COMPOSED = {"composed": {"test": {"target": {"gallery": 10000, "queries": 1000, "r1": 43.26, "r5": 82.0, "r10": 93.5,
                                             "r50": 100.0}},
                         "harmonic": {"target": {"r1": 45.0}}},
            "image_only": {}, "text_only": {}}
MATCHING = {"test": {"all": {"i2t": {"r1": 61.24}, "t2i": {"r1": 40.0}, "rsum": 412.3},
                     "folds_average": {"rsum": 480.04}, "counts": {"images": 5000, "captions": 25000}},
            "novel": {"all": {"i2t": {"r1": 50.0}, "t2i": {"r1": 30.0}, "rsum": 350.0},
                      "counts": {"images": 1000, "captions": 5000}}}


def write(folder, evaluate, steps=(600, 300)):
    folder.mkdir(exist_ok=True)
    (folder / "evaluate.json").write_text(json.dumps(evaluate))
    (folder / "pretrain.json").write_text(json.dumps({"steps": steps[0], "seconds": 160.7}))
    (folder / "train.json").write_text(json.dumps({"steps": steps[1], "seconds": 141.0}))


def test_composed_headline(tmp_path):
    write(tmp_path / "m", COMPOSED)
    assert headline(tmp_path / "m").splitlines() == [
        "| split | protocol | R@1 | R@5 | R@10 | R@50 | gallery | queries |",
        "|---|---|---|---|---|---|---|---|",
        "| test | target | 43.3 | 82.0 | 93.5 | 100.0 | 10000 | 1000 |",
        "pretrain: 600 steps in 161 s",
        "train: 300 steps in 141 s",
    ]


def test_matching_headline_and_a_missing_file(tmp_path):
    write(tmp_path / "m", MATCHING, steps=(1000, 0))
    lines = headline(tmp_path / "m").splitlines()
    assert lines[2] == "| test | 61.2 | 40.0 | 412.3 | 480.0 | 5000 | 25000 |"
    assert lines[3] == "| novel | 50.0 | 30.0 | 350.0 | — | 1000 | 5000 |"
    result = subprocess.run([sys.executable, "-m", "stages.headline", "--metrics", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "none/evaluate.json: no such file (has `evaluate` run?" in result.stderr
