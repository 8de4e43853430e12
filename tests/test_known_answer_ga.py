"""GA's adversarial and isotropic gradient augmentation equal the release's (fuxianghuang1/GA@f808df1 main.py
`gPenalty(img1, loss_value, lam=1e-6, q=1)` and `--random_grad`) on TIRG-LastConv with the same weights and inputs.

The known answers were recorded by tests/known_answers/ga/record.py, running the release's own training_1_iter
(`--use_gPenalty True` and/or `--random_grad True`, GA's default BBC + 0.001 MSE) on cirflow's weights exported
through tests/known_answers/layouts/tirg.py; random_grad's noise was drawn from a generator seeded as cirflow's
IsotropicNoise seeds its own (PROVENANCE.md there). cirflow runs with ga.isotropic_mode as_released, the mode that
reproduces the release's cumulative weights P - k + 1 over TIRGLastConv.RELEASED_PARAMETER_ORDER."""
from pathlib import Path

import pytest
import torch

from known_answers.tirg import tirg_family_cirflow as ka

FOLDER = Path(__file__).resolve().parent / "known_answers" / "ga"
SPEC = ka.load_spec(FOLDER)
EXPECTED = ka.expected(FOLDER)


@pytest.fixture(scope="module")
def built():
    yield from ka.built_model(SPEC)


def _isotropic_loss_term(model, run) -> float:
    """The value the release's random_grad adds to its tracked loss, 0.01·Σ_k (P-k+1)·(mean(ξ_k θ_k) + mean θ_k),
    through cirflow's loss form of the same term and the same noise stream."""
    from models.losses.ga import isotropic_term

    ga = ka.ga_config(run["ga"])
    with torch.no_grad():
        return isotropic_term(model, ga.isotropic_weight, ga.isotropic_mode,
                              torch.Generator().manual_seed(run["noise_seed"])).item()


def test_known_answer_ga_parameter_order_is_the_releases():
    """as_released weighs tensor k by P - k + 1 in the release's named_parameters() order: cirflow's
    TIRGLastConv.RELEASED_PARAMETER_ORDER must give that order (names mapped through the layout)."""
    from models.losses.ga import parameter_order

    model = ka.build(SPEC)
    assert [name for name, _ in parameter_order(model, "as_released")] == EXPECTED["release_parameter_order"]
    assert [name for name, _ in parameter_order(model, "clean")] != EXPECTED["release_parameter_order"]


def test_known_answer_ga_adversarial(built):
    """R_adv = (λ/2)·d^{1-1/q}·mean_i ‖B·∇_{x_i} L‖_q of the release's gPenalty, the loss L + R_adv, and the
    gradients of L + R_adv (double back-propagation through the input gradient)."""
    run, rec = SPEC["runs"]["adversarial"], EXPECTED["runs"]["adversarial"]
    ours = ka.step(ka.fresh(built), SPEC, run["loss"], run["ga"])
    assert ours["logs"]["ga_adversarial"] == pytest.approx(rec["penalty"], rel=1e-4)
    ka.assert_matches(ours, rec, SPEC["params"])


def test_known_answer_ga_penalty_gradient(built):
    """∂R_adv/∂θ alone (R_adv's share of the step's gradient is too small to be seen beside the loss's)."""
    rec = EXPECTED["penalty_gradient"]
    penalty, grads = ka.penalty_and_gradient(ka.fresh(built), SPEC, SPEC["runs"]["adversarial"]["loss"], SPEC["params"])
    assert penalty == pytest.approx(rec["penalty"], rel=1e-4)
    for p in SPEC["params"]:
        ka.assert_close_grad(p, grads[p], rec["grads"][p], rtol=1e-3, atol_rel=1e-4)


def test_known_answer_ga_isotropic(built):
    """The gradients after random_grad: cirflow's IsotropicNoise hook (as_released) adds what the release's loss
    terms add; the release's tracked loss is cirflow's plus the terms' value."""
    run, rec = SPEC["runs"]["isotropic"], EXPECTED["runs"]["isotropic"]
    model = ka.fresh(built)
    ours = ka.step(model, SPEC, run["loss"], run["ga"], run["noise_seed"])
    ka.assert_matches(ours, rec, SPEC["params"], compare_loss=False)
    assert ours["loss"] + _isotropic_loss_term(model, run) == pytest.approx(rec["loss"], rel=ka.LOSS_RTOL)
    # the same noise: as many draws as tensors, the first two (a, the scale) as the release's
    generator = torch.Generator().manual_seed(run["noise_seed"])
    first = torch.cat([torch.randn(4, generator=generator), torch.randn((), generator=generator).reshape(1)])
    torch.testing.assert_close(first, rec["noise_first"], rtol=0, atol=0)
    assert rec["noise_draws"] == len(list(model.parameters()))


def test_known_answer_ga_adversarial_and_isotropic(built):
    run, rec = SPEC["runs"]["adversarial_isotropic"], EXPECTED["runs"]["adversarial_isotropic"]
    model = ka.fresh(built)
    ours = ka.step(model, SPEC, run["loss"], run["ga"], run["noise_seed"])
    assert ours["logs"]["ga_adversarial"] == pytest.approx(rec["penalty"], rel=1e-4)
    ka.assert_matches(ours, rec, SPEC["params"], compare_loss=False)
    assert ours["loss"] + _isotropic_loss_term(model, run) == pytest.approx(rec["loss"], rel=ka.LOSS_RTOL)


def test_known_answer_ga_clean_mode_is_not_the_release(built):
    """isotropic_mode clean (every w_k = 1) gives other gradients: the as_released switch is what matches."""
    run, rec = SPEC["runs"]["isotropic"], EXPECTED["runs"]["isotropic"]
    ours = ka.step(ka.fresh(built), SPEC, run["loss"], {**run["ga"], "isotropic_mode": "clean"}, run["noise_seed"])
    with pytest.raises(AssertionError):
        ka.assert_close_grad("a", ours["grads"]["a"], rec["grads"]["a"])
