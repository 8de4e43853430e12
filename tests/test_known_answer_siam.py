"""Known answers of SIAM, guided image retrieval's text-guided re-ranker, recorded from the release
(sibasmarak/guided-image-retrieval@59f935a, src/model.py SpatialInformationAggregatorModule and its ResNet
`_forward_impl` modulation, utils/loss.py ContrastiveLoss) by tests/known_answers/siam/record.py.

Both sides run on the weights of cirflow's seeded dual encoder (tests/test_known_answer_dual_encoder.build_cirflow,
ResNet-50 image tower) and SIAM (stages.training.siam.build_siam after torch.manual_seed(siam_seed)), exported
through the `dual_encoder` and `siam` release layouts. What the release cannot run here is replaced by what cirflow
uses, the same on both sides (PROVENANCE.md): its Faster R-CNN proposals by the cells of the guide ResNet's layer4
map (cirflow's regions, `map_regions`), its guide ResNet-101 by the release's own ResNet-50 class holding the DE
image tower's trunk (cirflow's guide map is that tower), its BERT by fixed text-tower features.

Two recordings: `eval` (the guide ResNet's BatchNorm on running statistics, as cirflow's frozen DE tower runs in
stages.training.siam.siam_step) and `train` (the release's training_step, where Lightning leaves the guide ResNet
in training mode: batch statistics). cirflow's siam_step is compared with `eval`; cirflow's SIAM module given the
training-mode map is compared with `train`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.losses.matching import nce_loss
from models.matching.siam import map_regions
from known_answers.layouts import LAYOUTS
from stages.training.siam import build_siam, siam_step
from test_known_answer_dual_encoder import FixedTokenizer, build_cirflow, image_ids, make_batch, recipe_loss_config

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "known_answers" / "siam"
RTOL, ATOL = 1e-4, 1e-5
GRAD_ATOL = 1e-4  # times the gradient's largest |entry| (close_grad)
LINEARS = ("roi_linear", "alpha_linear", "beta_linear", "gamma_linear", "image_linear")
TRAIN_GRADS = ("alpha_linear.weight", "alpha_linear.bias", "beta_linear.weight", "beta_linear.bias",
               "image_linear.bias")  # the `train` recording keeps only these (fixture size)


def build_both(inputs: dict):
    """cirflow's frozen dual encoder (eval) and a fresh SIAM on it, as stages.train.train_siam builds them."""
    model = build_cirflow(inputs).requires_grad_(False).eval()
    torch.manual_seed(inputs["siam_seed"])
    return model, build_siam(model, inputs["image_size"], torch.device("cpu"))


@pytest.fixture(scope="module")
def recorded():
    return (json.loads((FIXTURES / "inputs.json").read_text()),
            torch.load(FIXTURES / "expected.pt", weights_only=True))


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def close_grad(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """SIAM's gradients are small (largest entries 2e-4 .. 2e-2), so a fixed atol of 1e-5 would hide a wrong one:
    atol = GRAD_ATOL × the tensor's largest |entry| (tighter than 1e-5 for every tensor here). Float32 rounding seen:
    up to 2.8e-5 of the scale (image_linear.bias, a sum over the batch; float64 puts both sides as far off)."""
    close(actual, expected, what, atol=GRAD_ATOL * expected.abs().max().item())


def grads_of(siam) -> dict[str, torch.Tensor]:
    out = {name: p.grad.detach().clone() for name, p in siam.named_parameters() if p.grad is not None}
    siam.zero_grad()
    return out


def test_known_answer_siam_eval_through_siam_step(recorded):
    """cirflow's SIAM training step (frozen DE tower in eval mode) against the release's forward and NCE with its
    guide ResNet in eval mode: the DE text features, SIAM's image features, the loss and every SIAM gradient."""
    torch.set_num_threads(1)
    inputs, expected = recorded
    rec = expected["eval"]
    model, siam = build_both(inputs)
    batch = make_batch(inputs)
    tau = recipe_loss_config().nce_tau
    loss, _ = siam_step(model, siam, FixedTokenizer(batch), tau, batch, torch.device("cpu"))
    loss.backward()
    grads = grads_of(siam)
    with torch.no_grad():
        maps = model.image_map(batch["image"])
        text = model.encode_text(batch["tokens"], batch["lengths"])
        features = siam(map_regions(maps), maps, text)
    close(text, rec["release_text_features"], "DE text features")  # the release normalises them itself
    # the release returns image_linear's output un-normalised (its loss normalises); cirflow normalises it
    close(features, F.normalize(rec["release_image_features"], dim=1), "SIAM image features")
    close(loss.detach(), rec["loss"], "NCE loss")
    assert set(grads) == {f"{m}.{t}" for m in LINEARS for t in ("weight", "bias")}
    for name, grad in rec["release_grads"].items():
        close_grad(grads[name], grad, f"d loss / d {name}")


def test_known_answer_siam_train_mode_guide(recorded):
    """The release's training_step: its guide ResNet's BatchNorm uses batch statistics. cirflow's SIAM module,
    given the DE tower's map in training mode and the eval-mode regions, computes the same."""
    torch.set_num_threads(1)
    inputs, expected = recorded
    rec = expected["train"]
    model, siam = build_both(inputs)
    batch = make_batch(inputs)
    with torch.no_grad():
        regions = map_regions(model.image_map(batch["image"]))  # the frozen region source (eval), as in `eval`
        text = model.encode_text(batch["tokens"], batch["lengths"])
        maps = model.train().image_map(batch["image"])  # BN on the batch's statistics
    features = siam(regions, maps, text)
    loss = nce_loss(features, text, image_ids(batch["image_id"]), recipe_loss_config().nce_tau)
    loss.backward()
    grads = grads_of(siam)
    close(features.detach(), F.normalize(rec["release_image_features"], dim=1), "SIAM image features (train)")
    close(loss.detach(), rec["loss"], "NCE loss (train)")
    for name in TRAIN_GRADS:
        close_grad(grads[name], rec["release_grads"][name], f"d loss / d {name} (train)")
    # the guide's BatchNorm mode matters: the two recordings differ
    assert (rec["loss"] - expected["eval"]["loss"]).abs() > 1e-3


def test_known_answer_siam_layout_round_trips(recorded):
    inputs, _ = recorded
    layout = LAYOUTS["siam"]
    _, siam = build_both(inputs)
    state = siam.state_dict()
    release = layout.release_state(state)
    assert set(release) == set(state)  # the same names on both sides
    back = layout.cirflow_state({**release, "object_detection_model.roi_heads.box_head.fc7.weight": torch.zeros(1),
                                 "guide_vision_model.conv1.weight": torch.zeros(1),
                                 "dual_encoder.vision_model.model.dense.weight": torch.zeros(1)})
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    del release["gamma_linear.bias"]
    with pytest.raises(KeyError, match="gamma_linear.bias"):
        layout.cirflow_state(release)
