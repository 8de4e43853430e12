"""Seeds, intervals and paired differences (pipelines/stats.py, pipelines/report.py's seeds mode)."""
import math

import pytest

from pipelines import report
from pipelines.stats import interval, paired_difference

T_975_2, T_975_4 = 4.302652729911275, 2.7764451051977987  # Student's t quantiles, 2 and 4 degrees of freedom


def test_interval_is_the_t_interval_over_seeds():
    ci = interval([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half_width == pytest.approx(T_975_2 * 1.0 / math.sqrt(3))
    assert ci.text() == "2.0 ± 2.5"
    one = interval([5.0])
    assert one.n == 1 and math.isnan(one.half_width) and one.text() == "5.0" and not one.excludes_zero()


def test_paired_difference_uses_the_shared_seeds_and_is_narrower_than_unpaired():
    a = {0: 50.0, 1: 60.0, 2: 70.0, 3: 55.0, 4: 65.0}
    b = {0: 49.0, 1: 58.5, 2: 69.0, 3: 53.0, 4: 64.5, 9: 0.0}  # seed 9 ran for b only
    diff = paired_difference(a, b)
    deltas = [1.0, 1.5, 1.0, 2.0, 0.5]
    sd = math.sqrt(sum((d - 1.2) ** 2 for d in deltas) / 4)
    assert diff.n == 5 and diff.mean == pytest.approx(1.2)
    assert diff.half_width == pytest.approx(T_975_4 * sd / math.sqrt(5))
    assert diff.excludes_zero() and diff.half_width < interval(list(a.values())).half_width
    with pytest.raises(ValueError, match="no seed"):
        paired_difference({0: 1.0}, {1: 1.0})


def rows_for(arm_values: dict[str, list[float]]):
    """CSV rows and `dvc exp show` rows of a sweep with arms x seeds, test R@1 as given, novel R@1 = test - 5."""
    sweep_rows, found = [], {}
    for arm, values in arm_values.items():
        for seed, value in enumerate(values):
            name = f"exp-{arm}-{seed}"
            sweep_rows.append({"experiment": name, "status": "done", "arm": arm, "seed": f"s{seed}"})
            found[name] = {"params.task": "composed", "params.evaluate.protocols": ["target"],
                           **{f"evaluate.composed.{split}.target.r{k}": value - (5 if split == "novel" else 0) + k
                              for split in ("test", "novel") for k in (1, 10, 50)},
                           "pretrain.seconds": 10.0, "train.seconds": 0.0}
    return sweep_rows, found


def test_seeds_report_gives_intervals_differences_sentences_and_a_figure(tmp_path):
    sweep_rows, found = rows_for({"tirg": [50.0, 52.0, 51.0], "ga": [53.0, 55.5, 54.0], "same": [50.5, 51.0, 51.5]})
    arms = report.by_arm(sweep_rows, found, "arm", "seed")
    keys = report.metric_keys([r for seeds in arms.values() for r in seeds.values()])
    table = report.seeds_table(arms, keys)
    assert "| tirg | 3 | 52.0 ± " in table  # test R@1 = value + 1
    diffs = report.differences(arms, keys, [("ga", "tirg"), ("same", "tirg")])
    assert diffs[("ga", "tirg")]["test R@1"].mean == pytest.approx(3.1666667)
    text = report.differences_table(diffs, keys)
    assert "| ga − tirg | 3 | +3.2 ± " in text and " *" in text and "* the 95% interval" in text
    alone = report.differences_table({("same", "tirg"): diffs[("same", "tirg")]}, keys)
    assert " *" not in alone and "* the 95% interval" not in alone  # no star, no footnote
    sentences = report.verdicts(diffs, ("test R@1", "novel R@1"))
    assert "ga is higher, the interval excludes zero" in sentences
    assert "same vs tirg (3 seeds): test R@1 +0.0" in sentences and "includes zero" in sentences
    png = tmp_path / "fig.png"
    report.draw(arms, keys, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    with pytest.raises(SystemExit, match="no arm 'nope'"):
        report.differences(arms, keys, [("nope", "tirg")])


def test_report_reads_a_sweep_csv_back_with_its_types_and_refuses_one_without_metrics(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("experiment,status,arm,seed,params.evaluate.protocols,evaluate.composed.test.target.r1,error\n"
                    "e1,done,tirg,s0,['target'],43.25,\n"
                    "e2,failed,tirg,s1,,,boom\n")
    rows = report.read_rows(good)
    assert rows == [{"experiment": "e1", "status": "done", "arm": "tirg", "seed": "s0",
                     "params.evaluate.protocols": ["target"], "evaluate.composed.test.target.r1": 43.25, "error": None}]
    bad = tmp_path / "bad.csv"
    bad.write_text("experiment,status,arm,seed\ne1,done,tirg,s0\n")
    with pytest.raises(SystemExit, match="bad.csv: experiment e1 has no evaluate.\\* columns"):
        report.read_rows(bad)
