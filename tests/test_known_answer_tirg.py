"""TIRG equals its release (google/tirg@c58daa0 TIRG, BBC and soft triplet) on the same weights and inputs.

The known answers were recorded by tests/known_answers/tirg/record.py, running the release's own training_1_iter
on cirflow's weights exported through tests/known_answers/layouts/tirg.py (PROVENANCE.md there). This test needs no
release code: it rebuilds the weights and inputs from inputs.json and runs cirflow's own objective."""
from pathlib import Path

import pytest
import torch

from known_answers.tirg import tirg_family_cirflow as ka

FOLDER = Path(__file__).resolve().parent / "known_answers" / "tirg"
SPEC = ka.load_spec(FOLDER)
EXPECTED = ka.expected(FOLDER)


@pytest.fixture(scope="module")
def built():
    yield from ka.built_model(SPEC)


def test_known_answer_tirg_bbc(built):
    run, rec = SPEC["runs"]["bbc"], EXPECTED["runs"]["bbc"]
    ours = ka.step(ka.fresh(built), SPEC, run["loss"])
    ka.assert_matches(ours, rec, SPEC["params"])


def test_known_answer_tirg_soft_triplet(built):
    """google/tirg's soft triplet (its hand-written backward halves the gradient: soft_triplet_half_gradient),
    on the triplets the release drew: 3 per anchor, the anchor's partner the positive."""
    run, rec = SPEC["runs"]["soft_triplet"], EXPECTED["runs"]["soft_triplet"]
    triplets = rec["triplets"].tolist()
    b = SPEC["batch_size"]
    assert len(triplets) == 3 * 2 * b and all(j == (i + b) % (2 * b) and k % b != i % b for i, j, k in triplets)
    ours = ka.step(ka.fresh(built), SPEC, run["loss"], triplets=triplets)
    ka.assert_matches(ours, rec, SPEC["params"])


def test_known_answer_tirg_soft_triplet_needs_the_half_gradient(built):
    """The switch is what makes the gradients the release's: without it every gradient is twice the recorded."""
    run, rec = SPEC["runs"]["soft_triplet"], EXPECTED["runs"]["soft_triplet"]
    ours = ka.step(ka.fresh(built), SPEC, {**run["loss"], "soft_triplet_half_gradient": False},
                   triplets=rec["triplets"].tolist())
    assert ours["loss"] == pytest.approx(rec["loss"], rel=1e-4)
    got = ka.summarize(ours["grads"]["residual.4.bias"])["head"]
    torch.testing.assert_close(got, 2 * rec["grads"]["residual.4.bias"]["head"], rtol=1e-4, atol=1e-7)


def test_known_answer_tirg_layout_round_trips_and_loads_a_release_state(built):
    """The name map covers the release's state_dict exactly (names and shapes recorded from the release model);
    a state in the release's names loads into a differently initialised cirflow model and gives the recorded
    features."""
    theirs = ka.assert_layout_round_trips(SPEC, ka.fresh(built), EXPECTED["release_shapes"])
    other = ka.build({**SPEC, "seeds": {**SPEC["seeds"], "model": SPEC["seeds"]["model"] + 1}})
    other.load_state_dict(ka.layout(SPEC).cirflow_state(theirs))
    ours = ka.step(other, SPEC, SPEC["runs"]["bbc"]["loss"])
    torch.testing.assert_close(ours["q"], EXPECTED["runs"]["bbc"]["q"], rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="img_model.extra"):
        ka.layout(SPEC).cirflow_state({**theirs, "img_model.extra": torch.zeros(1)})
    missing = dict(theirs)
    del missing["res_info_composer.5.bias"]
    with pytest.raises(KeyError, match="res_info_composer.5.bias"):
        ka.layout(SPEC).cirflow_state(missing)
