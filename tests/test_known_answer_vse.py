"""Known answers of VSE++'s hardest-negative hinge (max_violation), recorded from the release by
tests/known_answers/vse/record.py: sunnychencool/AOQ@5bfe620 modelAOQ.py ContrastiveLoss with its offline terms
switched off through its constructor (see that file). Loss-level: no encoder is run, no release layout exists.

Both sides get the same seeded unit-norm image (im) and caption (s) features; compared are the loss, its two
direction sums and the gradients w.r.t. both inputs. A batch where items 0 and 1 are two captions of one image
shows issue 24's row "online negatives exclude only the diagonal": the release counts each as the other's negative,
cirflow's training loss (models/losses/__init__.py `_vse`) always applies same_image_mask.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from models.losses import LOSSES
from models.losses.matching import same_image_mask, vse_max_violation
from test_known_answer_aoq import make_features

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "known_answers" / "vse"
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def recorded():
    return (json.loads((FIXTURES / "inputs.json").read_text()),
            torch.load(FIXTURES / "expected.pt", weights_only=True))


def features(inputs: dict, batch: str):
    spec = inputs["batches"][batch]
    f = make_features(spec["seed"], spec["b"], inputs["dim"], spec.get("image_ids"))
    return f["im"], f["s"]


def assert_close(actual, expected, what):
    assert torch.allclose(actual, expected, rtol=RTOL, atol=ATOL), \
        f"{what}: max |diff| {(actual - expected).abs().max().item():.3g}\ncirflow {actual}\nrelease {expected}"


def cirflow_vse(im, s, margin, same_image=None):
    v, u = im.clone().requires_grad_(True), s.clone().requires_grad_(True)
    loss = vse_max_violation(v @ u.T, margin, same_image)
    return (loss.detach(), *torch.autograd.grad(loss, [v, u]))


def training_vse(im, s, margin, image_ids):
    """The training path's loss: LOSSES['vse'] (what objectives.matching_loss calls), mask always on."""
    v, u = im.clone().requires_grad_(True), s.clone().requires_grad_(True)
    loss, _ = LOSSES["vse"].compute(SimpleNamespace(vse_margin=margin), None, v, u, torch.tensor(image_ids))
    return (loss.detach(), *torch.autograd.grad(loss, [v, u]))


def check(release, loss, grad_im, grad_s):
    assert_close(loss, release["loss"], "loss")
    assert_close(grad_im, release["grad"]["im"], "dL/dim")
    assert_close(grad_s, release["grad"]["s"], "dL/ds")


def test_known_answer_vse_inputs_regenerate(recorded):
    inputs, expected = recorded
    for batch in inputs["batches"]:
        im, s = features(inputs, batch)
        assert torch.equal(im, expected["inputs"][batch]["im"]) and torch.equal(s, expected["inputs"][batch]["s"])


def test_known_answer_vse_margin(recorded):
    """loss.vse_margin (params.yaml, pipelines/recipes/vse.yaml) is the release's marginonline default, 0.2."""
    _, expected = recorded
    root = HERE.parent
    assert yaml.safe_load((root / "params.yaml").read_text())["loss"]["vse_margin"] == expected["release_default_margin"]
    recipe = yaml.safe_load((root / "pipelines" / "recipes" / "vse.yaml").read_text())["params"]
    assert recipe["loss.vse_margin"] == expected["release_default_margin"]


def test_known_answer_vse_loss(recorded):
    """vse_max_violation (no mask) = the release's loss and gradients; each direction's sum too."""
    inputs, expected = recorded
    release = expected["release"]["unique"]
    im, s = features(inputs, "unique")
    check(release, *cirflow_vse(im, s, release["margin"]))
    sim = im @ s.T
    pos = sim.diagonal()
    off = sim.masked_fill(torch.eye(len(pos), dtype=torch.bool), float("-inf"))
    assert_close(torch.relu(release["margin"] + off.max(1).values - pos).sum(), release["caption_retrieval"], "(1)")
    assert_close(torch.relu(release["margin"] + off.max(0).values - pos).sum(), release["image_retrieval"], "(2)")


def test_known_answer_vse_training_loss_distinct_images(recorded):
    """The training loss on a batch of distinct images (its mask is then the diagonal) = the release."""
    inputs, expected = recorded
    release = expected["release"]["unique"]
    im, s = features(inputs, "unique")
    check(release, *training_vse(im, s, release["margin"], list(range(len(im)))))


def test_known_answer_vse_duplicate_image_batch(recorded):
    """Two captions of one image in the batch: vse_max_violation without a mask reproduces the release; the
    training loss (same_image_mask, no switch to turn it off) gives a different number."""
    inputs, expected = recorded
    release = expected["release"]["duplicate"]
    im, s = features(inputs, "duplicate")
    ids = inputs["batches"]["duplicate"]["image_ids"]
    check(release, *cirflow_vse(im, s, release["margin"]))
    trained = training_vse(im, s, release["margin"], ids)
    masked = cirflow_vse(im, s, release["margin"], same_image_mask(torch.tensor(ids)))
    for a, b in zip(trained, masked):
        assert torch.equal(a, b)
    assert release["loss"].item() - trained[0].item() > 0.1, (release["loss"].item(), trained[0].item())
