"""GA regularisers (models/losses/ga.py): adversarial input-gradient penalty and isotropic gradient noise."""
import math

import pytest
import torch
from torch import nn

from models.losses.ga import adversarial_penalty, isotropic_gradient_noise, isotropic_term

B, C, H, W = 4, 3, 2, 5
D = C * H * W


def _linear_loss(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """L = mean_i v·x_i  ⇒  ∇_{x_i} L = v / B,  B·∇_{x_i} L = v."""
    return (x * v).sum(dim=(1, 2, 3)).mean()


@pytest.mark.parametrize("q", [1.0, 2.0])
def test_adversarial_penalty_known_answer(q):
    torch.manual_seed(0)
    x = torch.randn(B, C, H, W, requires_grad=True)
    v = torch.randn(C, H, W)
    lam = 1e-3
    r = adversarial_penalty(_linear_loss(x, v), x, batch_size=B, lam=lam, q=q)
    norm_q = v.abs().pow(q).sum().pow(1 / q)
    expected = lam / 2 * D ** (1 - 1 / q) * norm_q
    assert torch.allclose(r, expected, rtol=1e-5)
    if q == 1.0:  # d^0 = 1: R_adv = (λ/2)·‖v‖₁
        assert torch.allclose(r, lam / 2 * v.abs().sum(), rtol=1e-5)


def test_adversarial_penalty_defaults_are_the_released_ones():
    x = torch.randn(B, C, H, W, requires_grad=True)
    v = torch.randn(C, H, W)
    r = adversarial_penalty(_linear_loss(x, v), x, batch_size=B)
    assert torch.allclose(r, 5e-7 * v.abs().sum(), rtol=1e-5)


def test_adversarial_penalty_gradient_reaches_the_parameters():
    """Double back-prop: with L = mean_i v·x_i and v a parameter, R = (λ/2)‖v‖₁ ⇒ ∂R/∂v = (λ/2)·sign(v)."""
    torch.manual_seed(1)
    v = nn.Parameter(torch.randn(C, H, W))
    x = torch.randn(B, C, H, W).requires_grad_(True)
    lam = 1e-2
    adversarial_penalty(_linear_loss(x, v), x, batch_size=B, lam=lam).backward()
    assert torch.allclose(v.grad, lam / 2 * torch.sign(v.detach()))


def test_adversarial_penalty_through_a_nonlinear_model():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(B, C, H, W).requires_grad_(True)
    loss = net(x).pow(2).mean()
    total = loss + adversarial_penalty(loss, x, batch_size=B, lam=1.0)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_adversarial_penalty_requires_a_grad_leaf():
    x = torch.randn(B, C, H, W)
    with pytest.raises(ValueError, match="requires_grad_"):
        adversarial_penalty(torch.zeros(()), x, batch_size=B)


class ThreeParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Parameter(torch.randn(2, 3))
        self.second = nn.Parameter(torch.randn(5))
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)  # not counted in P
        self.third = nn.Parameter(torch.randn(1, 4))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode,weights", [("clean", [1, 1, 1]), ("as_released", [3, 2, 1])])
def test_isotropic_noise_equals_the_formula(mode, weights):
    torch.manual_seed(0)
    m = ThreeParams()
    trainable = [m.first, m.second, m.third]
    before = [torch.randn_like(p) for p in trainable]
    for p, g in zip(trainable, before):
        p.grad = g.clone()
    isotropic_gradient_noise(m, weight=0.01, mode=mode, generator=_gen(7))
    gen = _gen(7)
    for w, p, g in zip(weights, trainable, before):
        xi = torch.randn(p.shape, generator=gen)
        assert torch.allclose(p.grad, g + w * 0.01 * (xi + 1) / p.numel(), atol=1e-7)
    assert m.frozen.grad is None


def test_as_released_differs_from_clean_by_the_running_sum_weights():
    m = ThreeParams()
    isotropic_gradient_noise(m, mode="clean", generator=_gen(3))
    clean = [p.grad.clone() for p in (m.first, m.second, m.third)]
    m.zero_grad(set_to_none=True)
    isotropic_gradient_noise(m, mode="as_released", generator=_gen(3))
    for w, p, c in zip([3, 2, 1], (m.first, m.second, m.third), clean):  # P − k + 1, P = 3
        assert torch.allclose(p.grad, w * c)


def test_isotropic_noise_mean_is_the_constant_drift():
    """E[w_k·weight·(ξ_k+1)/numel] = w_k·weight/numel."""
    m, n, gen = ThreeParams(), 4000, _gen(11)
    for _ in range(n):
        isotropic_gradient_noise(m, weight=0.01, mode="as_released", generator=gen)
    for w, p in zip([3, 2, 1], (m.first, m.second, m.third)):
        mean = p.grad / n
        target = w * 0.01 / p.numel()
        # per-element std of the mean is target/sqrt(n); allow 5 sigma
        assert torch.allclose(mean, torch.full_like(mean, target), atol=5 * target / math.sqrt(n))


@pytest.mark.parametrize("mode", ["clean", "as_released"])
def test_isotropic_term_backward_equals_the_post_backward_noise(mode):
    torch.manual_seed(0)
    m = ThreeParams()
    isotropic_term(m, weight=0.01, mode=mode, generator=_gen(5)).backward()
    via_term = [p.grad.clone() for p in (m.first, m.second, m.third)]
    m.zero_grad(set_to_none=True)
    isotropic_gradient_noise(m, weight=0.01, mode=mode, generator=_gen(5))
    for a, b in zip(via_term, (m.first.grad, m.second.grad, m.third.grad)):
        assert torch.allclose(a, b, atol=1e-7)


def test_isotropic_term_value_matches_the_released_form():
    m = ThreeParams()
    gen, r = _gen(9), 0.0
    for w, p in zip([3, 2, 1], (m.first, m.second, m.third)):
        xi = torch.randn(p.shape, generator=gen)
        r += w * ((xi * p).mean() + p.mean()).item()
    assert math.isclose(isotropic_term(m, 0.01, "as_released", _gen(9)).item(), 0.01 * r, rel_tol=1e-5)


def test_isotropic_mode_is_checked():
    with pytest.raises(ValueError, match="mode"):
        isotropic_gradient_noise(ThreeParams(), mode="cumulative")


def released_tirg_lastconv_names() -> list[str]:
    """model.named_parameters() of the GA release's TIRGLastConv, in order, from a module laid out as the release's
    (fuxianghuang1/GA img_text_composition_models.py: the base class registers normalization_layer, then img_model =
    ResNet-18 with fc = Sequential(Linear), text_model (text_model.py TextLSTMModel: embedding_layer, lstm,
    fc_output = (Dropout, Linear)); TIRGLastConv then a, mod2d, mod2d_gate = (BatchNorm2d, Conv2d, ReLU, Conv2d)).
    PyTorch yields a module's own parameters before its children's, so `a` comes first although it is registered
    after three children (the release's class itself, run beside this repo, lists the same 83 names)."""
    import torchvision
    from torch import nn

    class Layout(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalization_layer = nn.Module()
            self.normalization_layer.norm_s = nn.Parameter(torch.ones(1))
            self.img_model = torchvision.models.resnet18(weights=None)
            self.img_model.fc = nn.Sequential(nn.Linear(512, 512))
            self.text_model = nn.Module()
            self.text_model.embedding_layer = nn.Embedding(20, 512)
            self.text_model.lstm = nn.LSTM(512, 512)
            self.text_model.fc_output = nn.Sequential(nn.Dropout(0.1), nn.Linear(512, 512))
            self.a = nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))
            stack = lambda: nn.Sequential(nn.BatchNorm2d(1024), nn.Conv2d(1024, 1024, 3), nn.ReLU(),  # noqa: E731
                                          nn.Conv2d(1024, 512, 3))
            self.mod2d, self.mod2d_gate = stack(), stack()

    return [name for name, _ in Layout().named_parameters()]


RELEASE_TO_CIRFLOW = [("normalization_layer.norm_s", "normalize.scale"), ("img_model.fc.0.", "image_fc."),
                      ("img_model.", "feature_extractor."), ("text_model.embedding_layer.", "text_encoder.embedding."),
                      ("text_model.lstm.", "text_encoder.lstm."), ("text_model.fc_output.", "text_encoder.head."),
                      ("mod2d_gate.", "gate."), ("mod2d.", "residual.")]


def test_as_released_isotropic_weights_follow_the_released_parameter_order():
    from stages.common.params import parse
    from stages.modeling.factory import ModelConfig, build_model
    from models.losses.ga import parameter_order
    from tiny_repo import model_params

    cfg = parse(ModelConfig, "model", model_params(
        name="tirg_lastconv", embed_dim=512, image={"encoder": "resnet18", "weights": None, "channels": [16]},
        text={"encoder": "lstm", "embed_dim": 512, "hidden_dim": 512, "dropout": 0.1}))
    model = build_model(cfg, 20, 64)

    def renamed(name: str) -> str:
        for old, new in RELEASE_TO_CIRFLOW:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    released = [renamed(n) for n in released_tirg_lastconv_names()]
    assert released[:2] == ["a", "normalize.scale"] and len(released) == 83
    assert [n for n, _ in parameter_order(model, "as_released")] == released
    own = [n for n, _ in model.named_parameters()]
    assert own[-1] == "normalize.scale" and own != released  # cirflow registers the scale last: order matters

    # a is the release's first tensor (w_1 = P, the generator's first draw), the scale its second (w_2 = P - 1)
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    isotropic_gradient_noise(model, weight=0.01, mode="as_released", generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    xi_a, xi_scale = torch.randn(4, generator=generator), torch.randn((), generator=generator)
    P = len(released)
    assert torch.allclose(model.a.grad, P * 0.01 * (xi_a + 1) / 4)
    assert torch.allclose(model.normalize.scale.grad, (P - 1) * 0.01 * (xi_scale + 1))
