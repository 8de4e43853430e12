"""GA wired into a training step: the adversarial term is added to the loss, the isotropic noise to the grads."""
import torch
import yaml

from models.losses.ga import adversarial_penalty
from models.losses.metric import batch_based_classification
from stages.modeling.factory import ModelConfig, build_model
from stages.training.objectives import GAConfig, LossConfig, isotropic_noise, training_loss, with_ga
from tiny_repo import REPO, model_params
from stages.common.params import parse
from stages.modeling.vocab import Vocab

MODEL = model_params(**{"name": "tirg", "embed_dim": 16, "norm_scale": 4.0,
         "image": {"encoder": "small_cnn", "weights": None, "channels": [4]},
         "text": {"embed_dim": 8, "hidden_dim": 8, "dropout": 0.0}})
LOSS = parse(LossConfig, "loss", {**yaml.safe_load((REPO / "params.yaml").read_text())["loss"], "name": "bbc"})
OFF = dict(adversarial=False, adversarial_lambda=1e-6, adversarial_q=1.0, isotropic=False,
           isotropic_weight=0.01, isotropic_mode="clean")


def setup():
    torch.manual_seed(0)
    vocab = Vocab.build(["make it red", "add a blue circle"])
    model = build_model(parse(ModelConfig, "model", MODEL), len(vocab), 8).eval()
    batch = {"ref": torch.randn(4, 3, 8, 8), "tgt": torch.randn(4, 3, 8, 8),
             "text": ["make it red", "add a blue circle", "make it", "red"]}

    def step(model, batch):
        _, q, t, _ = training_loss(model, LOSS, vocab, batch, torch.device("cpu"))
        return batch_based_classification(q, t), {}
    return model, batch, step


def test_adversarial_term_is_added_with_its_formula_and_trains_the_model():
    model, batch, step = setup()
    ga = parse(GAConfig, "ga", {**OFF, "adversarial": True, "adversarial_lambda": 0.5})
    loss, logs = with_ga(step, ga)(model, batch)
    ref = batch["ref"].clone().requires_grad_(True)
    plain, _ = step(model, {**batch, "ref": ref})
    expected = adversarial_penalty(plain, ref, 4, lam=0.5, q=1.0)
    assert logs["ga_adversarial"] > 0
    assert torch.allclose(loss, plain + expected, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.image_encoder.parameters())
    assert not batch["ref"].requires_grad  # the caller's batch is left untouched


def test_ga_off_is_the_plain_step_and_adds_no_hook():
    _, _, step = setup()
    ga = parse(GAConfig, "ga", OFF)
    assert with_ga(step, ga) is step
    assert isotropic_noise(ga, seed=0) is None


def test_isotropic_hook_adds_noise_with_mean_weight_over_numel():
    model, batch, step = setup()
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
