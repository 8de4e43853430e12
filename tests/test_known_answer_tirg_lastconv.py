"""TIRG-LastConv equals its release (fuxianghuang1/GA@f808df1 TIRGLastConv, `--model tirg`, with the GA repo's
BBC / soft triplet + 0.001 MSE) on the same weights and inputs.

The known answers were recorded by tests/known_answers/tirg_lastconv/record.py, running the release's own
training_1_iter on cirflow's weights exported through tests/known_answers/layouts/tirg.py (PROVENANCE.md there). This
test needs no release code: it rebuilds the weights and inputs from inputs.json and runs cirflow's own objective."""
from pathlib import Path

import pytest
import torch

from known_answers.tirg import tirg_family_cirflow as ka

FOLDER = Path(__file__).resolve().parent / "known_answers" / "tirg_lastconv"
SPEC = ka.load_spec(FOLDER)
EXPECTED = ka.expected(FOLDER)


@pytest.fixture(scope="module")
def built():
    yield from ka.built_model(SPEC)


def test_known_answer_tirg_lastconv_bbc(built):
    """GA's default loss: BBC + 0.001·mean((q̂ - t̂)²) (loss.ga_mse_weight)."""
    run, rec = SPEC["runs"]["bbc"], EXPECTED["runs"]["bbc"]
    assert run["loss"]["ga_mse_weight"] == 0.001
    ours = ka.step(ka.fresh(built), SPEC, run["loss"])
    ka.assert_matches(ours, rec, SPEC["params"])


def test_known_answer_tirg_lastconv_soft_triplet(built):
    """GA's soft triplet (google/tirg's, half gradient) + 0.001 MSE, on the triplets the release drew."""
    run, rec = SPEC["runs"]["soft_triplet"], EXPECTED["runs"]["soft_triplet"]
    ours = ka.step(ka.fresh(built), SPEC, run["loss"], triplets=rec["triplets"].tolist())
    ka.assert_matches(ours, rec, SPEC["params"])


def test_known_answer_tirg_lastconv_needs_the_mse_term(built):
    """Without the GA repo's MSE term the loss is off by 0.001·mean((q̂ - t̂)²) of the recorded features: ~2e-5 of
    the loss, which the loss tolerance (LOSS_RTOL) sees."""
    run, rec = SPEC["runs"]["bbc"], EXPECTED["runs"]["bbc"]
    ours = ka.step(ka.fresh(built), SPEC, {**run["loss"], "ga_mse_weight": 0.0})
    mse = float(((rec["q"] - rec["t"]) ** 2).mean())
    assert ours["loss"] == pytest.approx(rec["loss"] - 0.001 * mse, rel=1e-5)
    assert abs(ours["loss"] - rec["loss"]) > 3 * ka.LOSS_RTOL * rec["loss"]


def test_known_answer_tirg_lastconv_layout_round_trips_and_loads_a_release_state(built):
    """The name map covers the release's state_dict exactly (names and shapes recorded from GA's TIRGLastConv);
    a state in the release's names loads into a differently initialised cirflow model and gives the recorded
    features."""
    theirs = ka.assert_layout_round_trips(SPEC, ka.fresh(built), EXPECTED["release_shapes"])
    assert theirs["normalization_layer.norm_s"].shape == (1,)
    other = ka.build({**SPEC, "seeds": {**SPEC["seeds"], "model": SPEC["seeds"]["model"] + 1}})
    other.load_state_dict(ka.layout(SPEC).cirflow_state(theirs))
    ours = ka.step(other, SPEC, SPEC["runs"]["bbc"]["loss"])
    torch.testing.assert_close(ours["q"], EXPECTED["runs"]["bbc"]["q"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours["t"], EXPECTED["runs"]["bbc"]["t"], rtol=1e-4, atol=1e-5)
