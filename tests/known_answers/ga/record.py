"""Record GA's known answers (adversarial and isotropic gradient augmentation, fuxianghuang1/GA@f808df1 main.py
`gPenalty` and `--random_grad`) from the released code on TIRGLastConv with cirflow's weights:
tests/known_answers/ga/{inputs.json,expected.pt}.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python tests/known_answers/ga/record.py --release /work/releases/GA

The release's own training_1_iter runs one step with `--use_gPenalty True` and/or `--random_grad True` (BBC + the
GA repo's 0.001 MSE, GA's default loss); recorded: the penalty R_adv its gPenalty returned, the loss it tracked,
the gradients `total_loss.backward()` left (after random_grad's terms), the release's named_parameters() order
(the order random_grad weighs by P - k + 1), and, from a separate call of the release's gPenalty, ∂R_adv/∂θ.
random_grad's `torch.randn_like` draws from a torch.Generator seeded with the run's noise_seed (see
tests/known_answers/tirg/tirg_family_release.py): cirflow's IsotropicNoise(ga, noise_seed) draws the same ξ_k.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tirg_record = _load("tirg_record", _HERE.parent / "tirg" / "record.py")
tirg_lastconv_record = _load("tirg_lastconv_record", _HERE.parent / "tirg_lastconv" / "record.py")
import tirg_family_cirflow as cs  # noqa: E402  (tirg/record.py put tests/known_answers/tirg on sys.path)

BBC = {"name": "bbc", "ga_mse_weight": 0.001, "soft_triplet_half_gradient": False}
GA = {"adversarial_lambda": 1e-6, "adversarial_q": 1.0, "isotropic_weight": 0.01, "isotropic_mode": "as_released"}

SPEC = copy.deepcopy(tirg_lastconv_record.SPEC)
SPEC.update({
    "method": "ga",
    "seeds": {"model": 20, "inputs": 21, "forward": 22, "numpy": 23},
    "texts": ["w10 w04 w16", "w07", "w18 w18 w02 w11", "w06 w13"],
    "runs": {
        "adversarial": {"release_opt": {"loss": "batch_based_classification", "use_gPenalty": True},
                        "loss": BBC, "ga": {**GA, "adversarial": True, "isotropic": False}},
        "isotropic": {"release_opt": {"loss": "batch_based_classification", "random_grad": True},
                      "loss": BBC, "ga": {**GA, "adversarial": False, "isotropic": True}, "noise_seed": 24},
        "adversarial_isotropic": {"release_opt": {"loss": "batch_based_classification", "use_gPenalty": True,
                                                  "random_grad": True},
                                  "loss": BBC, "ga": {**GA, "adversarial": True, "isotropic": True},
                                  "noise_seed": 25},
    },
})


def extra(release, spec: dict, state: dict, cirflow_model, expected: dict) -> None:
    """The release's parameter order, and R_adv with its gradient from the release's gPenalty."""
    opt = tirg_lastconv_record.release_opt(spec, {"release_opt": {"loss": "batch_based_classification"}})
    model = tirg_record.load_release_model(release, spec, opt, state)
    expected["release_parameter_order"] = tirg_record.release_parameter_order(spec, model)
    layout = cs.layout(spec)
    batch = cs.inputs(spec)
    value, grads = release.penalty_gradient(model, batch["ref"].numpy(), batch["text"], batch["tgt"].numpy(),
                                            spec["seeds"]["forward"], [layout.names[p] for p in spec["params"]])
    ours = {release_name: name for name, release_name in layout.names.items()}
    expected["penalty_gradient"] = {
        "penalty": value,
        "grads": {ours[k]: cs.summarize(layout.to_cirflow.get(ours[k], lambda t: t)(g)) for k, g in grads.items()}}
    cirflow_model.load_state_dict(layout.cirflow_state(state))
    mine, my_grads = cs.penalty_and_gradient(cirflow_model, spec, BBC, spec["params"])
    worst = max(cs.max_abs_diff(cs.summarize(my_grads[p])["head"], expected["penalty_gradient"]["grads"][p]["head"])
                / max(float(expected["penalty_gradient"]["grads"][p]["head"].abs().max()), 1e-30)
                for p in spec["params"])
    print(f"ga/penalty_gradient: release R_adv {value:.6e}, cirflow {mine:.6e}; grads max rel. diff {worst:.2e}")


if __name__ == "__main__":
    tirg_record.main(SPEC, "ga", tirg_lastconv_record.release_opt, extra)
