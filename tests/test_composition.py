"""The five composition models behind one interface: built from params, trained by one loss function,
embedded the same way by `mine` and `evaluate`."""
import copy

import pytest
import torch
import yaml

from stages.modeling.factory import ModelConfig, as_vector, build_model, zeros_like
from models.losses.metric import metric_loss
from stages.training.objectives import GAConfig, LossConfig, training_loss
from stages.common.params import ParamsError, parse
from stages.training.loop import LoopConfig, fit
from stages.modeling.vocab import Vocab
from tiny_repo import REPO

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
VOCAB = Vocab(["add", "circle", "make", "red", "small"])
TEXTS = ["add red circle", "make it small", "red", "add small circle", "make red", "circle"]
PAIRS = [("tirg", "bbc"), ("tirg", "soft_triplet"), ("tirg_lastconv", "bbc"), ("composeae", "bbc"),
         ("composeae", "soft_triplet"), ("val", "val_matching"), ("val", "bbc"), ("amc", "amc")]


def model_cfg(name: str, **changes) -> ModelConfig:
    raw = copy.deepcopy(PARAMS["model"])
    raw.update(name=name, embed_dim=32)
    raw["image"]["channels"] = [8, 16, 32]
    raw["text"].update(embed_dim=16, hidden_dim=16)
    raw.update(changes)
    return parse(ModelConfig, "model", raw)


def loss_cfg(name: str, **changes) -> LossConfig:
    return parse(LossConfig, "loss", {**PARAMS["loss"], "name": name, **changes})


def batch(seed: int = 0, n: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"ref": torch.randn(n, 3, 32, 32, generator=g), "tgt": torch.randn(n, 3, 32, 32, generator=g),
            "text": TEXTS[:n], "query_id": [f"q{i}" for i in range(n)]}


@pytest.mark.parametrize("name,loss", PAIRS)
def test_every_model_trains_through_the_one_loss_function(name, loss):
    torch.manual_seed(0)
    model = build_model(model_cfg(name), len(VOCAB), 32).train()
    value, q, t, logs = training_loss(model, loss_cfg(loss), VOCAB, batch(), torch.device("cpu"))
    assert value.ndim == 0 and torch.isfinite(value)
    assert q.shape == t.shape and q.shape[0] == 6
    value.backward()
    # VAL's self-attention projections sit behind w_s = 0 at init (spec §3.2), so only they may lack a gradient
    frozen_at_init = {"query", "key", "value", "merge"} if name == "val" else set()
    missing = [n for n, p in model.named_parameters()
               if (p.grad is None or not p.grad.any()) and not frozen_at_init & set(n.split("."))]
    assert missing == []


@pytest.mark.parametrize("name", ["tirg", "tirg_lastconv", "composeae", "val", "amc"])
def test_query_and_gallery_vectors_share_one_space(name):
    torch.manual_seed(0)
    model = build_model(model_cfg(name), len(VOCAB), 32).eval()
    images = batch()["ref"]
    tokens, lengths = VOCAB.batch(TEXTS)
    with torch.no_grad():
        composed = as_vector(model.compose(model.encode_reference(images), model.encode_text(tokens, lengths)))
        blank = as_vector(model.compose(zeros_like(model.encode_reference(images)), model.encode_text(tokens, lengths)))
        gallery = as_vector(model.encode_image(images))
    assert composed.shape == gallery.shape == blank.shape and composed.shape[0] == 6
    assert not torch.allclose(composed, blank)  # the reference image changes the query


def test_as_vector_ranks_per_level_outputs_by_the_sum_of_level_cosines():
    g = torch.Generator().manual_seed(1)
    queries = [torch.randn(4, d, generator=g) for d in (3, 5, 7)]
    gallery = [torch.randn(9, d, generator=g) for d in (3, 5, 7)]
    by_vector = as_vector(queries) @ as_vector(gallery).T
    by_levels = sum(torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
                    for q, x in zip(queries, gallery))
    assert torch.allclose(by_vector, by_levels / 3, atol=1e-6)
    assert torch.equal(by_vector.argsort(dim=1), by_levels.argsort(dim=1))


def test_a_loss_of_another_model_is_refused_naming_the_params():
    with pytest.raises(ParamsError, match="loss.name: 'val_matching' trains the val model only, model.name is 'tirg'"):
        loss_cfg("val_matching").check_model("tirg", 32, "pretrain")
    with pytest.raises(ParamsError, match="pretrain.batch_size: soft_triplet"):
        loss_cfg("soft_triplet").check_model("tirg", 400, "pretrain")


def test_half_gradient_quirk_halves_only_the_gradient():
    q = torch.randn(5, 8, requires_grad=True)
    t = torch.randn(5, 8)
    torch.manual_seed(3)
    full = metric_loss(loss_cfg("soft_triplet"), q, t)
    (grad_full,) = torch.autograd.grad(full, q)
    torch.manual_seed(3)
    half = metric_loss(loss_cfg("soft_triplet", soft_triplet_half_gradient=True), q, t)
    (grad_half,) = torch.autograd.grad(half, q)
    assert torch.allclose(full, half)
    assert torch.allclose(grad_half, 0.5 * grad_full)


def test_ga_repo_mse_term_adds_weight_times_mean_squared_error():
    q, t = torch.randn(4, 6), torch.randn(4, 6)
    plain = metric_loss(loss_cfg("bbc"), q, t)
    with_mse = metric_loss(loss_cfg("bbc", ga_mse_weight=0.001), q, t)
    assert torch.allclose(with_mse - plain, 0.001 * ((q - t) ** 2).mean(), atol=1e-6)


def test_composeae_adds_its_weighted_auxiliary_terms():
    torch.manual_seed(0)
    model = build_model(model_cfg("composeae"), len(VOCAB), 32).eval()
    weights = [1.0, 0.1, 0.1, 0.01]
    value, _, _, logs = training_loss(model, loss_cfg("bbc", composeae_weights=weights), VOCAB, batch(),
                                      torch.device("cpu"))
    expected = (logs["main_loss"] + 0.1 * logs["reconstruction_image"] + 0.1 * logs["reconstruction_text"]
                + 0.01 * logs["rotational_symmetry"])
    assert value.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name,loss", [("val", "val_matching"), ("amc", "amc"), ("composeae", "bbc")])
def test_gradient_augmentation_plugs_into_every_model(name, loss):
    def gradients(adversarial: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(model_cfg(name), len(VOCAB), 32).eval()  # eval: no dropout, same graph twice
        ga = parse(GAConfig, "ga", {**PARAMS["ga"], "adversarial": adversarial, "adversarial_lambda": 1e-2})
        step = lambda m, b: training_loss(m, loss_cfg(loss), VOCAB, b, torch.device("cpu"), ga)[::3]  # (loss, logs)
        value, logs = step(model, batch())
        assert ("ga_adversarial" in logs) == adversarial and logs.get("ga_adversarial", 1) > 0
        value.backward()  # with GA: through the penalty's second-order graph
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, augmented = gradients(False), gradients(True)
    assert plain.keys() == augmented.keys()
    assert any(not torch.allclose(plain[n], augmented[n]) for n in plain)


def loop_cfg(**changes) -> LoopConfig:
    raw = {**PARAMS["pretrain"], "steps": 6, "batch_size": 6, "checkpoint_every": 100, "log_every": 3,
           "optimizer": "adam", "lr": 1e-2, **changes}
    return parse(LoopConfig, "pretrain", raw)


def test_the_saved_model_is_the_ema_of_the_raw_trajectory(tmp_path):
    def run(ema_decay: float, work):
        torch.manual_seed(0)
        model = build_model(model_cfg("amc"), len(VOCAB), 32)
        seen = []

        def step(m, b):
            seen.append(dict(m.named_parameters())["proj.weight"].detach().clone())
            return training_loss(m, loss_cfg("amc"), VOCAB, b, torch.device("cpu"))[::3]

        fit(model, iter([batch(i) for i in range(6)]), step, loop_cfg(ema_decay=ema_decay), work, "t")
        return seen, dict(model.named_parameters())["proj.weight"].detach()

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    trajectory, last = run(0.0, tmp_path / "a")
    _, saved = run(0.5, tmp_path / "b")
    expected = trajectory[0]  # shadow_0 = θ_0; shadow_i = 0.5 shadow_(i-1) + 0.5 θ_i after step i
    for theta in [*trajectory[1:], last]:
        expected = 0.5 * expected + 0.5 * theta
    assert torch.allclose(saved, expected, atol=1e-6)
    assert not torch.allclose(saved, last)
