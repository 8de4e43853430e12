"""Known answers of guided image retrieval's dual encoder and NCE, recorded from the release
(sibasmarak/guided-image-retrieval@59f935a, src/model.py DualEncoder, utils/loss.py ContrastiveLoss) by
tests/known_answers/dual_encoder/record.py on the weights of cirflow's seeded model (image.encoder resnet50,
exported through the `dual_encoder` release layout, tests/known_answers/layouts/dual_encoder.py).

Compared: the image features (the release's timm ResNet-50 + dense against cirflow's torchvision ResNet-50 + fc +
image_projection), the text features (the release's language_model.dense against cirflow's text_projection on the
same fixed text-tower features: the release's BERT cannot run here, so both sides get cirflow's LSTM tower output),
the NCE loss of the batch through cirflow's training path (stages.training.objectives.matching_loss with the de_nce
recipe's loss section) and its gradients; and the NCE alone on given features with their input gradients.

The image heads differ in form (cirflow: Linear(2048 -> d) then Linear(d -> d); the release: one Linear(2048 -> d)):
the layout exports their product, and cirflow's gradients of the two factors are checked against the chain rule of
the release's gradient of the product. See tests/known_answers/dual_encoder/PROVENANCE.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from models.losses.matching import nce_loss
from stages.common.params import parse
from stages.modeling.factory import ModelConfig, build_model
from known_answers.layouts import LAYOUTS
from stages.training.objectives import LossConfig, matching_loss
from tiny_repo import model_params

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "known_answers" / "dual_encoder"
ROOT = HERE.parent
RTOL, ATOL = 1e-4, 1e-5
GRAD_ATOL = 1e-5  # times the gradient's largest |entry| (close_grad)
TRUNK_GRADS = ("conv1.weight", "bn1.weight", "layer4.2.bn3.weight", "layer4.2.bn3.bias")  # timm = torchvision names


# ---------------------------------------------------------------------------------------------- inputs (shared with record.py)


def recipe_loss_config() -> LossConfig:
    """params.yaml's loss section with the de_nce recipe's loss.* values (loss.name nce, loss.nce_tau)."""
    loss = yaml.safe_load((ROOT / "params.yaml").read_text())["loss"]
    recipe = yaml.safe_load((ROOT / "pipelines" / "recipes" / "de_nce.yaml").read_text())["params"]
    loss.update({key.split(".", 1)[1]: value for key, value in recipe.items() if key.startswith("loss.")})
    return parse(LossConfig, "loss", loss)


def build_cirflow(inputs: dict) -> torch.nn.Module:
    """cirflow's dual encoder from the seed and inputs.json's changes to params.yaml's model section, in training
    mode."""
    cfg = parse(ModelConfig, "model", model_params(**inputs["model"]))
    torch.manual_seed(inputs["model_seed"])
    return build_model(cfg, inputs["vocab_size"], inputs["image_size"], load_weights=False).train()


def make_batch(inputs: dict) -> dict:
    """A matching batch: images in [0, 1) (the release's ToTensor, no normalisation), one per caption (captions of
    one image get the same image), token ids and lengths; `image_id` names as the loader gives them."""
    spec = inputs["batch"]
    g = torch.Generator().manual_seed(spec["seed"])
    s = inputs["image_size"]
    names = spec["image_ids"]
    distinct = list(dict.fromkeys(names))
    pictures = torch.rand(len(distinct), 3, s, s, generator=g)
    tokens = torch.randint(1, inputs["vocab_size"], (len(names), max(spec["lengths"])), generator=g)
    lengths = torch.tensor(spec["lengths"])
    for row, n in enumerate(spec["lengths"]):
        tokens[row, n:] = 0
    return {"image": pictures[[distinct.index(n) for n in names]], "image_id": names,
            "text": [f"caption {i}" for i in range(len(names))], "tokens": tokens, "lengths": lengths}


class FixedTokenizer:
    """The batch's token ids for its captions (cirflow's tokenizer interface: batch(texts) -> tokens, lengths)."""

    def __init__(self, batch: dict):
        self.rows = {text: i for i, text in enumerate(batch["text"])}
        self.tokens, self.lengths = batch["tokens"], batch["lengths"]

    def batch(self, texts):
        rows = [self.rows[t] for t in texts]
        return self.tokens[rows], self.lengths[rows]


def image_ids(names: list[str]) -> torch.Tensor:
    ids = {name: i for i, name in enumerate(dict.fromkeys(names))}
    return torch.tensor([ids[n] for n in names])


def make_nce_features(spec: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Un-normalised image and text features (the release normalises inside its loss) and their image ids."""
    g = torch.Generator().manual_seed(spec["seed"])
    b, d = len(spec["image_ids"]), spec["dim"]
    return (torch.randn(b, d, generator=g) * 3, torch.randn(b, d, generator=g) * 3,
            torch.tensor(spec["image_ids"]))


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def recorded():
    return (json.loads((FIXTURES / "inputs.json").read_text()),
            torch.load(FIXTURES / "expected.pt", weights_only=True))


@pytest.fixture(scope="module")
def cirflow_run(recorded):
    """cirflow's features, loss and gradients on the recorded batch: its training path, one backward."""
    torch.set_num_threads(1)
    inputs, _ = recorded
    model = build_cirflow(inputs)
    batch = make_batch(inputs)
    tower = model.text_tower(batch["tokens"], batch["lengths"]).detach()
    loss, _ = matching_loss(model, recipe_loss_config(), FixedTokenizer(batch), batch, torch.device("cpu"))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.no_grad():
        v, u = model(batch["image"], batch["tokens"], batch["lengths"])
    return model, tower, v, u, loss.detach(), grads


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def close_grad(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Gradients: atol = GRAD_ATOL × the tensor's largest |entry|. Their scales run from 2e-3 (layer4.2.bn3) to 14.5
    (conv1, after the backward through 16 bottlenecks), where the two image heads (one product matrix against two
    factors) round differently: seen up to 1.9e-6 of the scale (conv1: 2.8e-5 absolute)."""
    close(actual, expected, what, atol=GRAD_ATOL * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------- tests


def test_known_answer_dual_encoder_features_and_loss(recorded, cirflow_run):
    _, expected = recorded
    _, tower, v, u, loss, _ = cirflow_run
    # the fixed text features both sides were fed (cirflow's LSTM tower, standing in for the release's BERT)
    close(tower, expected["text_tower_features"], "text tower features")
    # the release returns un-normalised projections and normalises in its loss; cirflow normalises in the model
    close(v, F.normalize(expected["release_image_features"], dim=1), "image features")
    close(u, F.normalize(expected["release_text_features"], dim=1), "text features")
    close(loss, expected["loss"], "NCE loss of the batch")


def test_known_answer_dual_encoder_gradients(recorded, cirflow_run):
    _, expected = recorded
    model, *_, grads = cirflow_run
    release = expected["release_grads"]
    for key in TRUNK_GRADS:  # the image trunks: the same tensors on both sides
        close_grad(grads[f"image_tower.backbone.{key}"], release[f"vision_model.model.backbone.{key}"], key)
    close_grad(grads["text_projection.weight"], release["language_model.dense.weight"], "text_projection.weight")
    close_grad(grads["text_projection.bias"], release["language_model.dense.bias"], "text_projection.bias")
    # image head: y = W_p (W_fc x + b_fc) + b_p is the release's y = W x + b with W = W_p W_fc, b = W_p b_fc + b_p;
    # from the release's G = dL/dW, g = dL/db follow dL/dW_fc = W_p^T G, dL/db_fc = W_p^T g,
    # dL/dW_p = G W_fc^T + g b_fc^T, dL/db_p = g
    G, g = release["vision_model.model.dense.weight"], release["vision_model.model.dense.bias"]
    fc, proj = model.image_tower.backbone.fc, model.image_projection
    with torch.no_grad():
        close_grad(grads["image_tower.backbone.fc.weight"], proj.weight.T @ G, "fc.weight (chain rule)")
        close_grad(grads["image_tower.backbone.fc.bias"], proj.weight.T @ g, "fc.bias (chain rule)")
        close_grad(grads["image_projection.weight"], G @ fc.weight.T + torch.outer(g, fc.bias),
                   "image_projection.weight (chain rule)")
        close_grad(grads["image_projection.bias"], g, "image_projection.bias")
    assert model.logit_scale.grad is None and "logit_scale" not in grads  # the faithful NCE has no temperature


def test_known_answer_dual_encoder_nce_on_given_features(recorded):
    inputs, expected = recorded
    v, u, ids = make_nce_features(inputs["nce"])
    nce = expected["nce"]
    # the release's ContrastiveLoss(temperature=0.07) and (temperature=1.0) gave the same value: the argument is unused
    assert nce["loss_temperature_0.07"].item() == nce["loss_temperature_1.0"].item()
    v.requires_grad_(True)
    u.requires_grad_(True)
    loss = nce_loss(v, u, ids, recipe_loss_config().nce_tau)
    loss.backward()
    close(loss.detach(), nce["loss_temperature_0.07"], "NCE on given features")
    close_grad(v.grad, nce["grad_image"], "dL/d image features")
    close_grad(u.grad, nce["grad_text"], "dL/d text features")


def test_known_answer_dual_encoder_layout_round_trips(recorded):
    inputs, _ = recorded
    layout = LAYOUTS["dual_encoder"]
    model = build_cirflow(inputs).eval()
    state = model.state_dict()
    release = layout.release_state(state)
    assert not any(k.startswith("text_tower.") or k == "logit_scale" for k in release)
    back = layout.cirflow_state(release)
    merged = {"image_tower.backbone.fc.weight", "image_tower.backbone.fc.bias", "image_projection.weight",
              "image_projection.bias"}
    # every mapped tensor comes back as it was; the image head comes back as the same affine map (fc = W, proj = I)
    assert set(back) == set(state) - {k for k in state if k.startswith("text_tower.")}
    for key in set(back) - merged:
        assert torch.equal(back[key], state[key]), key
    assert torch.equal(back["image_projection.weight"], torch.eye(model.dim))
    reloaded = build_cirflow(inputs).eval()
    reloaded.load_state_dict(back, strict=False)  # the text tower keeps its own weights
    batch = make_batch(inputs)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(batch["image"]), model.encode_image(batch["image"]),
                                   rtol=RTOL, atol=ATOL)
    # release -> cirflow -> release gives the release's tensors back
    again = layout.release_state({**back, **{k: v for k, v in state.items() if k.startswith("text_tower.")}})
    assert set(again) == set(release)
    for key, value in release.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
    # a checkpoint's BERT is not read; a missing tensor is named
    with_bert = {**release, "language_model.model.pooler.dense.weight": torch.zeros(1)}
    assert set(layout.cirflow_state(with_bert)) == set(back)
    del with_bert["vision_model.model.backbone.layer4.2.conv3.weight"]
    with pytest.raises(KeyError, match="layer4.2.conv3.weight"):
        layout.cirflow_state(with_bert)
