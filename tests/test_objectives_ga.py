"""GA wired into a training step: the adversarial term is the input gradient of the main metric loss alone (as
fuxianghuang1/GA main.py gPenalty(img1, loss_value)), the isotropic noise is added to the grads."""
import pytest
import torch
import torch.nn.functional as F
import yaml

from models.losses.ga import adversarial_penalty
from models.losses.metric import batch_based_classification
from stages.modeling.factory import ModelConfig, build_model
from stages.training.objectives import GAConfig, LossConfig, isotropic_noise, training_loss
from tiny_repo import REPO, model_params
from stages.common.params import parse
from stages.modeling.vocab import Vocab

MODEL = model_params(**{"name": "tirg", "embed_dim": 16, "norm_scale": 4.0,
         "image": {"encoder": "small_cnn", "weights": None, "channels": [4]},
         "text": {"embed_dim": 8, "hidden_dim": 8, "dropout": 0.0}})
LOSS = parse(LossConfig, "loss", {**yaml.safe_load((REPO / "params.yaml").read_text())["loss"], "name": "bbc"})
OFF = dict(adversarial=False, adversarial_lambda=1e-6, adversarial_q=1.0, isotropic=False,
           isotropic_weight=0.01, isotropic_mode="clean")


def setup(name: str = "tirg"):
    torch.manual_seed(0)
    vocab = Vocab.build(["make it red", "add a blue circle"])
    model = build_model(parse(ModelConfig, "model", {**MODEL, "name": name}), len(vocab), 8).eval()
    batch = {"ref": torch.randn(4, 3, 8, 8), "tgt": torch.randn(4, 3, 8, 8),
             "text": ["make it red", "add a blue circle", "make it", "red"]}

    def step(model, batch, ga=None):
        loss, _, _, logs = training_loss(model, LOSS, vocab, batch, torch.device("cpu"), ga)
        return loss, logs
    return model, batch, step, vocab


def main_loss_by_hand(model, vocab, ref, batch):
    """TIRG's batch-based classification on s-normalised q̂ = compose(x, t), t̂ = φ(target): no auxiliary term."""
    tokens, lengths = vocab.batch(batch["text"])
    q = model.normalize(model.compose(model.encode_reference(ref), model.encode_text(tokens, lengths)))
    t = model.normalize(model.encode_image(batch["tgt"]))
    return F.cross_entropy(q @ t.T, torch.arange(4))


def penalty_by_hand(loss, ref, lam):
    """(λ/2)·d^{1-1/q}·mean_i ‖B·∇_{x_i} L‖_q with q = 1, so d^0 = 1."""
    (grad,) = torch.autograd.grad(loss, ref, retain_graph=True)
    return lam / 2 * (4 * grad).flatten(1).abs().sum(1).mean()


def test_adversarial_term_is_added_with_its_formula_and_trains_the_model():
    model, batch, step, vocab = setup()
    ga = parse(GAConfig, "ga", {**OFF, "adversarial": True, "adversarial_lambda": 0.5})
    loss, logs = step(model, batch, ga)
    ref = batch["ref"].clone().requires_grad_(True)
    plain = main_loss_by_hand(model, vocab, ref, batch)
    expected = penalty_by_hand(plain, ref, 0.5)
    assert logs["ga_adversarial"] > 0 and logs["ga_adversarial"] == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(loss, plain + expected, rtol=1e-5)
    assert torch.allclose(expected, adversarial_penalty(plain, ref, 4, lam=0.5, q=1.0), rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.image_encoder.parameters())
    assert not batch["ref"].requires_grad  # the caller's batch is left untouched


def test_adversarial_term_is_the_gradient_of_the_main_metric_loss_only():
    model, batch, step, vocab = setup("composeae")  # ComposeAE adds reconstruction and symmetry terms of x
    ga = parse(GAConfig, "ga", {**OFF, "adversarial": True, "adversarial_lambda": 0.5})
    loss, logs = step(model, batch, ga)
    ref = batch["ref"].clone().requires_grad_(True)
    main = main_loss_by_hand(model, vocab, ref, batch)
    tokens, lengths = vocab.batch(batch["text"])
    phi_x, phi_t = model.encode_reference(ref), model.encode_text(tokens, lengths)
    aux = model.auxiliary_losses(phi_x, phi_t, model.compose(phi_x, phi_t), model.encode_image(batch["tgt"]),
                                 batch_based_classification)
    whole = main + 0.1 * aux["reconstruction_image"] + 0.1 * aux["reconstruction_text"] \
        + 0.01 * aux["rotational_symmetry"]
    of_main, of_whole = penalty_by_hand(main, ref, 0.5).item(), penalty_by_hand(whole, ref, 0.5).item()
    assert abs(of_main - of_whole) > 1e-3 * of_main  # the two readings differ on this model
    assert logs["ga_adversarial"] == pytest.approx(of_main, rel=1e-5)
    assert logs["main_loss"] == pytest.approx(main.item() + of_main, rel=1e-5)


def test_ga_off_adds_no_term_and_no_hook():
    model, batch, step, vocab = setup()
    ga = parse(GAConfig, "ga", OFF)
    loss, logs = step(model, batch, ga)
    assert "ga_adversarial" not in logs
    assert torch.allclose(loss, main_loss_by_hand(model, vocab, batch["ref"], batch))
    assert isotropic_noise(ga, seed=0) is None


def test_isotropic_hook_adds_noise_with_mean_weight_over_numel():
    model, batch, step, _ = setup()
    ga = parse(GAConfig, "ga", {**OFF, "isotropic": True, "isotropic_weight": 0.5})
    loss, _ = step(model, batch)
    loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    isotropic_noise(ga, seed=0)(model)
    scale = model.normalize.scale
    added = scale.grad - before["normalize.scale"]
    generator = torch.Generator().manual_seed(0)
    xi = {n: torch.randn(p.shape, generator=generator) for n, p in model.named_parameters()}
    assert torch.allclose(added, 0.5 * (xi["normalize.scale"] + 1) / scale.numel())
